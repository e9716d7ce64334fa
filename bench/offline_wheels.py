"""Wheels that let ``fedrep run`` start on an offline machine that already has PyTorch.

Why: a GPU machine lent for a benchmark often has PyTorch, NumPy and the usual scientific stack
but no package index, and takes only so many megabytes with it (64 MiB here). What a simulation
needs on top is Flower, Ray, pydantic and their own needs. Ray's wheel alone is 74 MB, 34 MB of
it Java jars that a Python-only simulation never loads, plus libraries fedrep never imports (RLlib,
Tune, Train, Serve, Data, the LLM tools): without them it is 37 MB, and the lot fits. This script
downloads the wheels for the target's Python (the versions installed here, so the machine runs
what the tests ran), rewrites Ray's without those parts, and builds fedrep's own wheel (its
entry points register the built-in strategies).

    python bench/offline_wheels.py --python-version 3.12 --out .whl
    # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site

The package list is what a CIFAR-10 ``fedrep run`` imported here (driver and actors) less what
the lent machine's image already had (``docs/bench/gpu_simulation.json`` was made this way).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported by a simulation run, absent from an image with PyTorch and the scientific stack.
NEEDED = ["flwr", "ray", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "grpcio",
          "grpcio-health-checking", "protobuf", "cryptography", "cffi", "pycryptodome", "iterators", "tomli",
          "tomli-w", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "jsonpointer",
          "rfc3339-validator", "sqlalchemy", "alembic", "mako", "fastapi", "starlette", "python-multipart",
          "sniffio", "wcwidth"]
# Parts of Ray a Python simulation never loads.
RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/data/", "ray/serve/", "ray/tune/", "ray/train/", "ray/llm/")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]


def prune_wheel(wheel: Path, drop: tuple[str, ...]) -> tuple[int, int]:
    """Rewrite ``wheel`` without the members under ``drop`` (and their RECORD lines); its sizes
    before and after."""
    before = wheel.stat().st_size
    pruned = wheel.with_suffix(".pruned")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            if item.filename.startswith(drop):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(
                    tuple(d.encode() for d in drop)))
            out.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    pruned.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the target machine's Python (default: this one's)")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in NEEDED]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms,
                    "-d", str(args.out), *pins], check=True)
    (ray,) = args.out.glob(f"ray-{version('ray')}-*.whl")
    before, after = prune_wheel(ray, RAY_UNUSED)
    print(f"{ray.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB without {', '.join(RAY_UNUSED)}")
    for old in args.out.glob("fedrep-*.whl"):
        old.unlink()
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(args.out), str(ROOT)], check=True)
    if not had_build:  # setuptools' scratch folder, left in the checkout
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    total = sum(w.stat().st_size for w in args.out.glob("*.whl"))
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
