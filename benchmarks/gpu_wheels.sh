#!/usr/bin/env bash
# Wheels the GPU machines lack (no network there; ENVIRONMENT.md "GPU machines"), mostly pure Python
# (xxhash and pyarrow, which TransformerLens imports through datasets, are built for CPython 3.12),
# downloaded here into wheels/ (git-ignored) and carried along with the run:
#   bash benchmarks/gpu_wheels.sh                      # here, once
#   run(command="bash benchmarks/gpu_run.sh", carry=["wheels"])   # on the device
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf wheels && mkdir wheels
pip download -q --no-deps -d wheels \
  transformer-lens==3.9.0 circuitsvis==1.43.3 jaxtyping==0.3.11 wadler_lindig==0.1.8 einops==0.8.2 \
  fancy-einsum==0.0.3 better-abc==0.0.3 beartype==0.23.1 typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 xxhash==4.1.0 typing_extensions==4.16.0 pyarrow==26.0.1 \
  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
ls wheels
