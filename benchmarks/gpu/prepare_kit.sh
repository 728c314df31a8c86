#!/usr/bin/env bash
# Fill .gpu/ (ignored) with what benchmarks/gpu/check.sh needs on a lent GPU machine that cannot
# reach the internet: the CIFAR-10 JPEG training split, wheels of the service's web stack for the
# device's Python 3.12 (its image already holds torch, torchvision, safetensors, pillow, numpy,
# matplotlib, tqdm, prometheus-client, httpx, uvloop), and wrk with its LuaJIT library.
# Run here, from the repository root: bash benchmarks/gpu/prepare_kit.sh   (about 6 MB of wheels)
set -euo pipefail
KIT=.gpu
DATA=${DATA:-../shared/data}
mkdir -p "$KIT/wheels" "$KIT/wrk"
cp "$DATA/cifar10-jpeg-train.tar.gz" "$KIT/"

# the versions this project's own environment runs (pyproject.toml resolves them), pinned for the device
PY=${PY:-.venv/bin/python}
pins=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(fastapi|fastapi.offline|starlette|pydantic|pydantic.core|pydantic.settings|python.dotenv|uvicorn|httptools|python.multipart|annotated.types|annotated.doc|typing.inspection)==')
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" $pins
cp /usr/bin/wrk "$KIT/wrk/"
cp -L /lib/x86_64-linux-gnu/libluajit-5.1.so.2 "$KIT/wrk/"
du -sh "$KIT"
