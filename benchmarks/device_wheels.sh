#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the wheels that the lent GPU machine's image lacks, for
# benchmarks/gpu_benchmarks.sh to install there: that machine reaches no package registry.
#
# The image (the device tool's KINDS.md, read 2026-11-17) has Python 3.12 with jax, jaxlib and
# its CUDA plugin, flax, optax, orbax-checkpoint, numpy, absl-py, etils, protobuf, pyarrow,
# matplotlib, pillow, torch and the rest of what bn_repro imports, but not the packages below.
# Their versions are the ones this repository's CI installs (pip freeze of `pip install -e
# '.[test]'`, 2026-12-07); --no-deps, so each one they need is named here too.
#
#   bash benchmarks/device_wheels.sh        # run here, in the repository root, where pip works
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
compiled=(array-record==0.8.6 grain==0.2.18 dm-tree==0.1.10)
pure=(ml-collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0
      googleapis-common-protos==1.76.0 importlib-resources==7.1.0 tensorboardX==2.6.5
      immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0
      toml==0.10.2 portpicker==1.6.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${compiled[@]}" "${pure[@]}"
# promise (needed by tensorflow-datasets) is published as a source archive only; it is pure Python.
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
ls .whl
du -sh .whl
