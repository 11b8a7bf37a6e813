#!/usr/bin/env bash
# One prepared check of kiln on a machine with an NVIDIA GPU: a few minutes, at most 8.5 (step timeouts).
#
#   bash scripts/gpu_check.sh        # in the repository, with .venv made (scripts/setup.sh, not run here)
#
# Three `kiln train` runs, each ending as kiln train ends by default, with the export of the trained
# model to ONNX and its parity check against PyTorch in onnxruntime (compress=none: the fp32 model
# is exported and checked; GPU_CHECK_COMPRESS=auto adds kiln's compression search, CPU minutes):
#   images   experiment=images_resnet trainer=gpu trainer.precision=bf16-mixed, plus
#            model.compile=true when the composed config has model.compile (kiln train --cfg job)
#   digits   experiment=digits_cnn trainer=gpu                     (the demo)
#   ddp      experiment=images_resnet trainer=ddp trainer.devices=1 (DistributedSampler, workers)
# each for GPU_CHECK_EPOCHS epochs (default 5). Per step it prints the wall seconds of the command,
# training images/s (train images x epochs / seconds of epochs 2..N from the epoch lines in the
# run's train.log, so start-up, torch.compile and worker start-up in epoch 1 are left out; with one
# epoch, of the whole trainer.fit from run.json), and peak GPU memory twice: torch's
# max_memory_allocated in the training process (the runs go through a 5-line wrapper that calls
# kiln's CLI main and writes it at exit; tensors only, not the allocator's cache or the CUDA
# context) and nvidia-smi's memory.used of the GPU sampled every 200 ms (everything on that GPU,
# other processes' included); and the training process's peak RSS (ru_maxrss). Then one line per step:
#   gpu_check: summary <step>: ok wall_s=W images_per_s=R fit_images_per_s=F delivery=D peak_alloc_mib=A peak_used_mib=U peak_rss_mib=M
# On a GPU it then runs the suite's gpu tier (`pytest -m gpu`, tests/test_gpu.py; GPU_CHECK_TESTS=0
# skips it, GPU_CHECK_TESTS_TIMEOUT is its limit, 420 s) and adds a "summary tests" line.
# (FAILED instead of ok, with the exit code, when a run fails, times out or does not ship its model).
#
# Without a GPU (torch.cuda.is_available() is False) it says "gpu_check: no GPU: CPU fallback" and
# runs the same steps tiny on the CPU: trainer=cpu, and trainer=ddp_cpu trainer.devices=1 for ddp,
# 32-bit, no compile, 1 epoch, no sanity check, the image steps limited to 2 training batches of 16
# and 1 validation and 1 test batch of 16, 3 latency repeats.
#
# Knobs (environment): PYTHON (default .venv/bin/python, else python3); GPU_CHECK_EPOCHS;
# GPU_CHECK_TINY (1: the CPU fallback's limits; default 1 on CPU, 0 on a GPU); GPU_CHECK_BATCHES
# (training batches of the tiny image steps, 2); GPU_CHECK_EXPORT (1: every step exports; 0: none,
# export.after_training=false; or the names of the steps that do, e.g. "digits");
# GPU_CHECK_COMPRESS (none); GPU_CHECK_COMPILE (0: never compile);
# GPU_CHECK_TIMEOUT (seconds for each step; on a GPU 240, 90, 180 by default); GPU_CHECK_OUT (where the runs go,
# default a new temp dir, kept); KILN_CACHE_DIR (the digit images; kiln's default ~/.cache/kiln).
# Exit status: 0 when every step passed, 1 when any failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kiln-gpu-check-XXXXXX")}"
mkdir -p "$OUT"
echo "gpu_check: python $PYTHON, runs in $OUT"

if [[ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())')" == "True" ]]; then
    GPU=1
    "$PYTHON" -c 'import torch; print("gpu_check: GPU", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| bf16", torch.cuda.is_bf16_supported())'
else
    GPU=0
    echo "gpu_check: no GPU: CPU fallback"
fi
EPOCHS="${GPU_CHECK_EPOCHS:-$([[ $GPU == 1 ]] && echo 5 || echo 1)}"
TINY="${GPU_CHECK_TINY:-$([[ $GPU == 1 ]] && echo 0 || echo 1)}"
# seconds per step (images, digits, ddp): on a GPU 240 + 90 + 180, inside a 10-minute command limit
# with room for torch.compile's first compile; GPU_CHECK_TIMEOUT sets all three
if [[ -n "${GPU_CHECK_TIMEOUT:-}" ]]; then
    TIMEOUTS=("$GPU_CHECK_TIMEOUT" "$GPU_CHECK_TIMEOUT" "$GPU_CHECK_TIMEOUT")
elif [[ $GPU == 1 ]]; then
    TIMEOUTS=(240 90 180)
else
    TIMEOUTS=(600 600 600)
fi

EXPORT="${GPU_CHECK_EXPORT:-1}"
COMMON=("trainer.max_epochs=$EPOCHS" "compress=${GPU_CHECK_COMPRESS:-none}" "progress=lines")
if [[ $TINY == 1 ]]; then COMMON+=("export.latency_repeats=3" "trainer.num_sanity_val_steps=0"); fi
TINY_IMAGES=()
if [[ $TINY == 1 ]]; then
    TINY_IMAGES=(data.batch_size=16 data.eval_batch_size=16 "+trainer.limit_train_batches=${GPU_CHECK_BATCHES:-2}"
        +trainer.limit_val_batches=1 +trainer.limit_test_batches=1)
fi

exports() { # does step $1 export? GPU_CHECK_EXPORT: 1 (every step), 0 (none) or step names
    [[ $EXPORT == 1 ]] || [[ " ${EXPORT//,/ } " == *" $1 "* ]]
}

# `kiln train` through kiln's own CLI main, writing at exit torch's peak GPU allocation and the
# process's peak RSS (bytes)
cat >"$OUT/kiln_peak.py" <<'EOF'
import os, resource, sys
from kiln.cli import main
try:
    code = main(sys.argv[1:])
finally:
    import torch
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.environ["GPU_CHECK_PEAK_FILE"], "w") as handle:
        handle.write(f"{gpu} {rss}")
sys.exit(code)
EOF

# images/s and the rest from a run directory: run.json, .hydra/config.yaml, train.log
read_run() {
    "$PYTHON" - "$1" <<'EOF'
import json, re, sys
from pathlib import Path
import yaml

runs = sorted(Path(sys.argv[1]).glob("train/*/run.json"))
if not runs:
    print("images_per_s=n/a fit_images_per_s=n/a delivery=n/a epochs=0 note=no_run_json")
    sys.exit()
run = runs[-1].parent
record = json.loads(runs[-1].read_text())
config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
fit = record.get("throughput") or {}
rows = fit.get("train_rows") or 0
limit = (config.get("trainer") or {}).get("limit_train_batches")
if isinstance(limit, int) and not isinstance(limit, bool):  # images per epoch under the limit
    rows = min(rows, limit * int(config["data"]["batch_size"]))
epochs = int(fit.get("epochs") or 0)
seconds = [
    float(m.group(1))
    for m in (re.search(r"\bepoch \d+/\d+\b.*\((\d+(?:\.\d+)?) s\)\s*$", line) for line in (run / "train.log").read_text().splitlines())
    if m
]
fit_rate = rows * epochs / fit["fit_seconds"] if fit.get("fit_seconds") else None
steady = rows * (len(seconds) - 1) / sum(seconds[1:]) if len(seconds) >= 2 and sum(seconds[1:]) > 0 else None
delivery = record.get("delivery") or {}
shipped = delivery.get("status") if isinstance(delivery, dict) else str(delivery)
print(
    f"images_per_s={(steady or fit_rate or 0):.1f} fit_images_per_s={(fit_rate or 0):.1f} "
    f"delivery={shipped or 'none'} epochs={len(seconds)} measured={'epochs_2_to_n' if steady else 'whole_fit'} "
    f"run_dir={run}"
)
EOF
}

# the GPU index nvidia-smi should watch: the first visible one
GPU_INDEX=0
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^[0-9]+ ]]; then GPU_INDEX="${BASH_REMATCH[0]}"; fi

SUMMARIES=()
FAILED=0
run_step() {
    local name=$1 timeout=$2
    shift 2
    local dir="$OUT/$name" peak_file="$OUT/$name.peak" used_file="$OUT/$name.used" sampler=""
    mkdir -p "$dir"
    if ! exports "$name"; then set -- "$@" export.after_training=false; fi
    echo
    echo "gpu_check: step $name: kiln train $*"
    if [[ $GPU == 1 ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU_INDEX" -lms 200 >"$used_file" 2>/dev/null &
        sampler=$!
    fi
    local started=$EPOCHREALTIME code=0
    GPU_CHECK_PEAK_FILE="$peak_file" timeout --kill-after=15 "$timeout" \
        "$PYTHON" "$OUT/kiln_peak.py" train "$@" "paths.output_dir=$dir" 2>&1 | tee "$OUT/$name.log"
    code=${PIPESTATUS[0]}
    local wall
    wall=$(awk -v now="$EPOCHREALTIME" -v then="$started" 'BEGIN { printf "%.1f", now - then }')
    if [[ -n $sampler ]]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
    local alloc="n/a" used="n/a" rss="n/a" peaks=()
    if [[ -s $peak_file ]]; then
        read -r -a peaks <"$peak_file"
        rss=$((peaks[1] / 1048576))
        if [[ $GPU == 1 ]]; then alloc=$((peaks[0] / 1048576)); fi
    fi
    if [[ -s $used_file ]]; then used=$(sort -n "$used_file" | tail -1 | tr -d ' '); fi
    local figures
    figures=$(read_run "$dir")
    local status=ok
    [[ $code == 124 || $code == 137 ]] && echo "gpu_check: step $name timed out after ${timeout}s"
    if [[ $code != 0 ]] || { exports "$name" && [[ $figures != *"delivery=passed"* ]]; }; then
        status="FAILED(exit=$code)"
        FAILED=1
    fi
    echo "gpu_check: step $name: $status, wall ${wall} s; $figures"
    echo "gpu_check: step $name: peak GPU memory: torch max_memory_allocated ${alloc} MiB (training process); nvidia-smi memory.used ${used} MiB (GPU $GPU_INDEX, sampled); peak RSS ${rss} MiB (training process, ru_maxrss)"
    SUMMARIES+=("gpu_check: summary $name: $status wall_s=$wall ${figures%% epochs=*} peak_alloc_mib=$alloc peak_used_mib=$used peak_rss_mib=$rss")
}

if [[ $GPU == 1 ]]; then
    IMAGES=(experiment=images_resnet trainer=gpu trainer.precision=bf16-mixed)
    if [[ "${GPU_CHECK_COMPILE:-1}" != 0 ]]; then
        has_compile=$("$PYTHON" -m kiln train --cfg job experiment=images_resnet |
            "$PYTHON" -c 'import sys, yaml; print("compile" in (yaml.safe_load(sys.stdin).get("model") or {}))')
        if [[ $has_compile == True ]]; then
            IMAGES+=(model.compile=true)
        else
            echo "gpu_check: model.compile is not a key of the composed config (kiln train --cfg job experiment=images_resnet): compile skipped"
        fi
    fi
    DIGITS=(experiment=digits_cnn trainer=gpu)
    DDP=(experiment=images_resnet trainer=ddp trainer.devices=1)
else
    IMAGES=(experiment=images_resnet trainer=cpu)
    DIGITS=(experiment=digits_cnn trainer=cpu)
    DDP=(experiment=images_resnet trainer=ddp_cpu trainer.devices=1)
fi

run_step images "${TIMEOUTS[0]}" "${IMAGES[@]}" "${TINY_IMAGES[@]}" "${COMMON[@]}"
run_step digits "${TIMEOUTS[1]}" "${DIGITS[@]}" "${COMMON[@]}"
run_step ddp "${TIMEOUTS[2]}" "${DDP[@]}" "${TINY_IMAGES[@]}" "${COMMON[@]}"

# the test suite's gpu tier (pytest -m gpu: bf16-mixed, torch.compile, DDP on one GPU, export of a
# CUDA-trained checkpoint with parity on the CPU); without a GPU those tests only skip, so not run here
if [[ $GPU == 1 && "${GPU_CHECK_TESTS:-1}" != 0 ]]; then
    echo
    echo "gpu_check: step tests: pytest -m gpu"
    started=$EPOCHREALTIME
    timeout --kill-after=15 "${GPU_CHECK_TESTS_TIMEOUT:-420}" "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
    code=${PIPESTATUS[0]}
    wall=$(awk -v now="$EPOCHREALTIME" -v then="$started" 'BEGIN { printf "%.1f", now - then }')
    status=ok
    if [[ $code != 0 ]]; then status="FAILED(exit=$code)"; FAILED=1; fi
    SUMMARIES+=("gpu_check: summary tests: $status wall_s=$wall $(grep -Eo '[0-9]+ (passed|failed|skipped)' "$OUT/tests.log" | paste -sd' ')")
fi

echo
printf '%s\n' "${SUMMARIES[@]}"
if [[ $FAILED != 0 ]]; then
    echo "gpu_check: FAILED (runs and logs in $OUT)"
    exit 1
fi
echo "gpu_check: all steps passed (runs and logs in $OUT)"
