# The app image: Flower's official SuperExec image plus PyTorch, fedrep and the deploy scripts.
# It runs the ServerApp executor, every SuperNode's ClientApp executor and the one-shot node
# registration. SuperLink and SuperNode run Flower's official images unchanged (they never
# import the app). Build context: the repository root (docker compose does this).
# BASE_IMAGE: Flower's SuperExec image of the pinned version, or a substitute (a private registry's
# copy, or deploy/local_images.sh's image built from Debian packages where no registry is reachable).
ARG BASE_IMAGE=flwr/superexec:1.41.0
FROM ${BASE_IMAGE}
# PIP_INSTALL_FLAGS: e.g. "--no-index --no-build-isolation" where the base image already holds
# every dependency (the local images do) and no package index is reachable.
ARG PIP_INSTALL_FLAGS=""

WORKDIR /app
# CPU PyTorch from PyTorch's own index (the default index resolves to multi-GB CUDA wheels).
# For GPU nodes build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir ${PIP_INSTALL_FLAGS} "torch==2.13.0" --index-url "${TORCH_INDEX}"

# The app and its remaining dependencies, installed once here: runs must not install anything
# (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION below). Ray is only needed for simulation, so
# the image takes plain `flwr` (already in the base image) instead of `flwr[simulation]`.
COPY --chown=app:app pyproject.toml README.md /tmp/fedrep-src/
COPY --chown=app:app fedrep /tmp/fedrep-src/fedrep
COPY --chown=app:app server /tmp/fedrep-src/server
COPY --chown=app:app clients /tmp/fedrep-src/clients
RUN sed -i 's/flwr\[simulation\]/flwr/' /tmp/fedrep-src/pyproject.toml \
 && python -m pip install --no-cache-dir ${PIP_INSTALL_FLAGS} /tmp/fedrep-src \
 && rm -rf /tmp/fedrep-src
COPY --chown=app:app deploy/register_supernodes.py /app/deploy/register_supernodes.py

# Mount points for the results volume (ServerApp) and the head-state volume (ClientApp); made
# here so that fresh named volumes inherit the non-root owner.
RUN mkdir -p /app/runs /app/state
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["flower-superexec"]
