#!/usr/bin/env bash
# The GPU check of issue 15 item 7, as one command for a machine with a CUDA device and no
# network (the lent GPU machine): install hpcbatch's missing dependencies from wheels in
# .whl/ (fetched beforehand on a machine with PyPI by `bash benchmarks/gpu.sh --fetch`),
# install hpcbatch itself without dependencies, then run benchmarks/gpu.py.
#
#   bash benchmarks/gpu.sh --fetch                     # here: download the wheels into .whl/
#   bash benchmarks/gpu.sh [gpu.py arguments...]       # there: install and run
set -euo pipefail
cd "$(dirname "$0")/.."
# what the GPU image lacks of hpcbatch's dependencies (its torch, numpy, pandas, psutil, click,
# pyyaml, matplotlib, jinja2, msgpack, toolz, cloudpickle, fsspec ... are used as they are)
WHEELS="dask==2026.8.0 distributed==2026.8.0 dask-jobqueue==0.9.0 bokeh==3.9.2 xyzservices==2026.9.1
tornado==6.6.1 tblib==3.2.2 zict==3.0.0 partd==1.4.2 locket==1.0.0 pyro-ppl==1.9.2 pyro-api==0.1.2
SQLAlchemy==2.1.9 greenlet zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c"
if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux1_x86_64 -d .whl "$w"
    done
    du -sh .whl
    exit 0
fi
SITE=/tmp/hpcbatch-site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# hpcbatch itself (its workloads register through entry points, so it must be installed)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true
OUT_JSON="${OUT:-benchmarks}/results-gpu.json"
python3 benchmarks/gpu.py --out "$OUT_JSON" "$@"
