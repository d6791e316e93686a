#!/usr/bin/env bash
# Wheels of the project's dependencies that a bare GPU image lacks, for a GPU node that cannot install from PyPI
# (no internet): run this where pip can download, take `.whl/` along, and benchmarks/gpu.sh installs them into a
# temporary folder before its stages. The versions are those of this machine's .venv (PYTHON=... for another);
# the wheels are for CPython 3.12 on x86-64 Linux (PY_VERSION=3.11 ... for another image).
#
#   benchmarks/device_wheels.sh      # -> .whl/*.whl (~37 MB, PyAV's FFmpeg most of it)
#
# The list is what an image with torch, Lightning, transformers, scikit-image, OpenCV and pytest (a typical CUDA
# image, and this workplace's) misses of pyproject.toml's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
packages=(omegaconf braceexpand webdataset av taming-transformers jsonargparse docstring_parser typeshed_client)
rm -rf .whl && mkdir .whl
for name in "${packages[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "error: $PY: $name is not installed (make install first, or set PYTHON)" >&2; exit 2; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$name==$version"
done
echo "wrote $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1), to .whl/"
