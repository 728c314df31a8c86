#!/usr/bin/env bash
# The GPU check, one prepared run on a lent GPU machine (issues 2 and 4; see benchmarks/gpu/README.md):
#   1. the default image recipe trained on the GPU, timed (issue 2: "the GPU path works");
#   2. the service on CUDA, benchmarked with the bundled image checkpoint: batched vs MAX_BATCH_SIZE=1
#      and the in-process limit (benchmarks/serving/run.py --device auto);
#   3. with the time left, a larger recipe towards the 94% goal, whose weights come back in parts.
# Everything it reports lands in $OUT (the device tool fetches it): report.md, log lines, manifests,
# the serving results. GPU_CHECK_SMOKE=1 runs every step in a minute or two, to check the script
# on a CPU.
set -uo pipefail
START=$SECONDS
OUT=${OUT:-$PWD/gpu-out}
KIT=${GPU_KIT:-.gpu}                    # made by benchmarks/gpu/prepare_kit.sh, carried to the device
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}     # stop starting work after this many seconds (the call's limit is 600)
BIG_ARGS=${GPU_CHECK_BIG_ARGS:---config widths=[96,384,384] --epochs 30}
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
REPORT=$OUT/report.md
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

say() { echo "$*" | tee -a "$REPORT"; }
elapsed() { echo $((SECONDS - START)); }

# ---- packages and tools: the device's image has torch and the numeric stack; the web stack travels
if compgen -G "$KIT/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$KIT"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -x "$KIT/wrk/wrk" ]; then
    export PATH=$PWD/$KIT/wrk:$PATH LD_LIBRARY_PATH=$PWD/$KIT/wrk${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

say "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "- $("$PY" -c 'import platform, torch; print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", (torch.cuda.get_device_name() if torch.cuda.is_available() else "(CPU run)"))')"
say "- $(nproc) CPUs; wrk: $(command -v wrk || echo absent)"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/- GPU: /' | tee -a "$REPORT"

# ---- data
DATA=/tmp/gpu-data
mkdir -p "$DATA" && tar -xzf "$KIT/cifar10-jpeg-train.tar.gz" -C "$DATA" || exit 1
limit=(); [ "$SMOKE" = 1 ] && limit=(--limit 2000 --epochs 1)

train() {  # name, seconds allowed, extra arguments…: trains into /tmp/gpu-runs/NAME, reports time and metrics
    local name=$1 allowed=$2; shift 2
    local began=$SECONDS
    mkdir -p /tmp/gpu-runs
    timeout "$allowed" "$PY" -m training pretrain-image --data "$DATA/train" --output "/tmp/gpu-runs/$name" \
        --name "cifar10-$name" "$@" "${limit[@]}" 2>&1 | grep -v -E 'it/s\]|s/it\]' > "/tmp/gpu-runs/$name.log"
    local status=${PIPESTATUS[0]}
    say ""
    say "## Training: $name ($*), exit $status$([ "$status" = 124 ] && echo ': out of time'), $((SECONDS - began)) s wall"
    "$PY" - "/tmp/gpu-runs/$name" <<'PY' | tee -a "$REPORT"
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / "manifest.json"
if not path.is_file():
    print("- no checkpoint written")
    raise SystemExit
manifest = json.loads(path.read_text())
validation, calibration = manifest["metrics"].get("validation", {}), manifest["calibration"]
epochs = [epoch.get("seconds", 0.0) for epoch in validation.get("history", [])]
print(f"- validation accuracy {validation.get('accuracy', float('nan')):.4f}, "
      f"macro-F1 {validation.get('macro_f1', float('nan')):.4f}, ECE {calibration.get('ece_before', float('nan')):.4f} "
      f"-> {calibration.get('ece_after', float('nan')):.4f} (T = {calibration.get('temperature')}), "
      f"device {validation.get('device')}")
print(f"- {len(epochs)} epochs, {sum(epochs):.1f} s in epochs (first ones: {', '.join(f'{s:.1f}' for s in epochs[:3])} s)")
PY
    # manifest, plots and the training log in one file (at most 8 files come back)
    (cd /tmp/gpu-runs && tar -cf "$OUT/$name-checkpoint-meta.tar" --exclude model.safetensors "$name" "$name".*)
    return "$status"
}

# ---- 1. the default recipe
train default "$BUDGET_S" --device auto

# ---- 2. the service on CUDA (image models only: the text models need spaCy, which does not travel)
if [ "$(elapsed)" -lt "$BUDGET_S" ]; then
    mkdir -p /tmp/gpu-models && cp -r checkpoints/cifar10-fastconv checkpoints/cifar10-trunk /tmp/gpu-models/
    serving=(--duration 10 --rounds 1); [ "$SMOKE" = 1 ] && serving=(--duration 2 --rounds 1 --levels 1,8 --batch-sizes 1,8)
    "$PY" benchmarks/serving/run.py --task image --model-dir /tmp/gpu-models --device auto \
        --configs batched,unbatched "${serving[@]}" --output "$OUT/serving" 2>&1 | grep -v "HTTP Request" \
        > /tmp/serving.log
    status=${PIPESTATUS[0]}
    say ""
    say "## Serving on the GPU (benchmarks/serving/run.py, exit $status): see serving.md"
    grep -E "^- |In-process" "$OUT/serving.md" 2> /dev/null | tee -a "$REPORT"
    [ "$status" = 0 ] || tail -n 30 /tmp/serving.log | tee -a "$REPORT"
fi

# ---- 3. a larger recipe, in the time left
left=$((BUDGET_S - $(elapsed)))
if [ "$left" -gt 60 ]; then
    # shellcheck disable=SC2086  # BIG_ARGS is a list of arguments
    train big "$left" --device auto $BIG_ARGS
    if [ -f /tmp/gpu-runs/big/model.safetensors ]; then  # at most 16 MiB a file comes back: in parts
        split -b 15M -d /tmp/gpu-runs/big/model.safetensors "$OUT/big-model.safetensors.part-"
        say "- weights in $(ls "$OUT"/big-model.safetensors.part-* | wc -l) parts (cat them), sha256 $(sha256sum /tmp/gpu-runs/big/model.safetensors | cut -c1-64)"
    fi
else
    say ""
    say "## Larger recipe skipped: ${left} s left of the budget"
fi
say ""
say "Total $(elapsed) s."
