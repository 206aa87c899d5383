#!/usr/bin/env bash
# The wheels bench/gpu/run.sh installs on a GPU machine without network: the versions this
# project pins (pyproject.toml), for the machine's CPython 3.12 on x86-64, into .whl/
# (ignored by git; name it in the device tool's `carry`). Run once, here, with network.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP="${PYTHON:-python3} -m pip"
pinned() { .venv/bin/pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
mkdir -p .whl
for name in diffusers transformers huggingface_hub tokenizers hf-xet; do
    version=$(pinned "$name")
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
du -sh .whl
