# The app image: Flower's official SuperExec image plus PyTorch, fedrep and the deploy scripts.
# It runs the ServerApp executor, every SuperNode's ClientApp executor and the one-shot node
# registration. SuperLink and SuperNode run Flower's official images unchanged (they never
# import the app). Build context: the repository root (docker compose does this).
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

WORKDIR /app
# CPU PyTorch from PyTorch's own index (the default index resolves to multi-GB CUDA wheels).
# For GPU nodes build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX}"

# The app and its remaining dependencies, installed once here: runs must not install anything
# (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION below). Ray is only needed for simulation, so
# the image takes plain `flwr` (already in the base image) instead of `flwr[simulation]`.
COPY --chown=app:app pyproject.toml README.md /tmp/fedrep-src/
COPY --chown=app:app fedrep /tmp/fedrep-src/fedrep
COPY --chown=app:app server /tmp/fedrep-src/server
COPY --chown=app:app clients /tmp/fedrep-src/clients
RUN sed -i 's/flwr\[simulation\]/flwr/' /tmp/fedrep-src/pyproject.toml \
 && python -m pip install --no-cache-dir /tmp/fedrep-src \
 && rm -rf /tmp/fedrep-src
COPY --chown=app:app deploy/register_supernodes.py /app/deploy/register_supernodes.py

# Mount points for the results volume (ServerApp) and the head-state volume (ClientApp); made
# here so that fresh named volumes inherit the non-root owner.
RUN mkdir -p /app/runs /app/state
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["flower-superexec"]
