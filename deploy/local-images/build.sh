#!/usr/bin/env bash
# Build the deployment's images on a machine that reaches no image registry (only Debian's and
# Python's package mirrors), with podman:
#   1. a Debian base from Debian's packages (debootstrap --variant=minbase, podman import);
#   2. Flower (FLWR_VERSION), a CPU PyTorch and fedrep's dependencies on it, tagged as
#      localhost/fedrep-local/{superlink,supernode,superexec}:FLWR_VERSION;
#   3. the app image (the compose file's superexec build) on that superexec image.
# Each step is skipped when its image exists (FEDREP_REBUILD=1 rebuilds). Then run the compose
# file with the printed variables. Needs root (debootstrap), podman, debootstrap and pip.
set -euo pipefail
cd "$(dirname "$0")/../.."
FLWR_VERSION=${FLWR_VERSION:-1.41.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SUITE=${DEBIAN_SUITE:-bookworm}
# The Debian mirror: DEBIAN_MIRROR, else the one this machine's apt uses, else deb.debian.org.
apt_mirror() {
  { { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
    grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } \
    | grep -v -e security -e '^$' | head -1; } || true  # no sources file: the default below
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${FEDREP_IMAGE_WORK:-/var/tmp/fedrep-images}
PREFIX=localhost/fedrep-local
PODMAN=${PODMAN:-podman}
mkdir -p "$WORK"
say() { echo "[local-images] $(date -u +%T) $*" >&2; }
exists() { [ "${FEDREP_REBUILD:-0}" != 1 ] && $PODMAN image exists "$1"; }

if ! exists "$PREFIX/debian:$SUITE"; then
  say "debootstrap $SUITE from $MIRROR"
  rm -rf "$WORK/rootfs"
  # Exit 3: a package mirror could not be used (nothing to fix in the recipe; see the log).
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; say "debootstrap from $MIRROR failed"; exit 3; }
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
  tar -C "$WORK/rootfs" -c . | $PODMAN import - "$PREFIX/debian:$SUITE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

if ! exists "$PREFIX/superexec:$FLWR_VERSION"; then
  say "wheels: flwr==$FLWR_VERSION, torch==$TORCH_VERSION (CPU) and fedrep's dependencies"
  ctx="$WORK/flwr-context"
  rm -rf "$ctx" && mkdir -p "$ctx/wheels"
  # fedrep's runtime dependencies as pyproject.toml pins them (Ray is for simulation only), plus
  # what building fedrep without an index needs.
  python3 - > "$ctx/requirements.txt" <<PY
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith(("flwr", "torch"))))
print("torch==$TORCH_VERSION\nsetuptools>=68\nwheel")
PY
  python3 -m pip download --quiet --only-binary=:all: --dest "$ctx/wheels" \
    "flwr==$FLWR_VERSION" -r "$ctx/requirements.txt" || { say "pip download failed"; exit 3; }
  cp deploy/local-images/flwr.Containerfile "$ctx/Containerfile"
  say "image $PREFIX/superexec:$FLWR_VERSION (also tagged superlink, supernode)"
  $PODMAN build --quiet --build-arg "DEBIAN_BASE=$PREFIX/debian:$SUITE" \
    --build-arg "FLWR_VERSION=$FLWR_VERSION" -t "$PREFIX/superexec:$FLWR_VERSION" "$ctx" >/dev/null
  $PODMAN tag "$PREFIX/superexec:$FLWR_VERSION" "$PREFIX/superlink:$FLWR_VERSION" "$PREFIX/supernode:$FLWR_VERSION"
  rm -rf "$ctx"
fi

say "app image fedrep-superexec:latest on $PREFIX/superexec:$FLWR_VERSION"
$PODMAN build --quiet --build-arg "BASE_IMAGE=$PREFIX/superexec:$FLWR_VERSION" \
  --build-arg "PIP_INSTALL_FLAGS=--no-index --no-build-isolation" \
  -f deploy/docker/superexec.Dockerfile -t fedrep-superexec:latest . >/dev/null
say "done; run the compose file with:"
cat <<VARS
export FLWR_VERSION=$FLWR_VERSION FLWR_SUPERLINK_IMAGE=$PREFIX/superlink FLWR_SUPERNODE_IMAGE=$PREFIX/supernode \\
       FLWR_SUPEREXEC_IMAGE=$PREFIX/superexec FEDREP_PIP_INSTALL_FLAGS="--no-index --no-build-isolation"
VARS
