#!/usr/bin/env bash
# The GPU check: one prepared script that a lent GPU machine runs in under 8 minutes (issue 19).
#
#   bash benchmarks/gpu_check.sh                  # on a CUDA machine, from any folder
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # or --cpu-smoke: the same steps, smaller, on the CPU
#   bash benchmarks/gpu_check.sh --dry-run        # print the Python, wheels, PYTHONPATH and results it would use
#
# Needs the repository and no network. Python: $PYTHON, else .venv/bin/python, else python3 (a lent GPU
# machine: its image has torch, timm and most dependencies); in that last case the wheels in .whl/
# (benchmarks/gpu_wheels.sh makes them here; the device tool carries them) are installed first into
# $GPU_CHECK_SITE (default /tmp/site), and wsi-mil runs from this source tree with PYTHONPATH=SITE:ROOT.
# Steps, each timed, each with a time limit inside one overall budget ($GPU_CHECK_BUDGET_S, default 450 s
# on CUDA), each failure recorded without stopping the later steps:
#   wheels      (python3 with .whl/ only) pip install of .whl/*.whl into the site folder; pip_check: `pip
#               check` of the image with them, less the data packages' lines (recorded, not fatal)
#   env         nvidia-smi, torch, CUDA, the GPU's architectures; the versions of torch, timm and the other
#               dependencies that ran, beside what constraints.txt pins
#   cohort      `wsi-mil sample-data` (12 slides), and an input folder listing them twice (24 slide ids)
#   extract_*   `wsi-mil extract` on CUDA with resnet50_trunc (its weights when this machine has them,
#               else random: extract_cnn) and a ViT-L/16 preset (uni, random weights: extract_vit), each
#               at its default precision, GPU utilisation sampled every 200 ms (nvidia-smi) meanwhile
#   alone_*     the encoder alone at the run's device, batch, precision and memory format (tiles/s), and
#               end to end / encoder alone (target >= 0.9)
#   cosine_*    the same tiles of 2 slides extracted on the CPU in float32: per-tile cosine (>= 0.999)
#   train       `wsi-mil train`, 2 folds, amp_bf16, on CUDA; then `predict` on CUDA and `heatmap`
# The CPU mode checks the script itself: 6 slides, timm's tiny test networks (test_resnet, test_vit)
# for the two encoders, longer time limits. GPU_CHECK_CNN / GPU_CHECK_VIT choose other encoders.
# Results: gpu_check.txt and gpu_check.json (the summary), steps.tsv, meta.json, env.json, one JSON per
# figure, util_*.csv (the raw samples), heatmap_example.png and logs/<step>.log, in
# benchmarks/results/gpu_check/ (benchmarks/results/gpu_check_cpu_smoke/ in CPU mode). When $OUT is set (the
# device tool returns that folder, at most 8 files from it), they are written to $GPU_CHECK_WORK/results
# instead and $OUT gets gpu_check.txt, gpu_check.json, steps.tsv, heatmap_example.png and
# gpu_check_results.tar.gz (the whole results folder), refreshed after every step. Slides and features go
# to $GPU_CHECK_WORK (default: a new folder under /tmp), not into the results.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEVICE=${GPU_CHECK_DEVICE:-cuda} DRY_RUN=0
for arg in "$@"; do
    case $arg in
    --cpu-smoke) DEVICE=cpu ;;
    --dry-run) DRY_RUN=1 ;;
    *)
        echo "unknown argument '$arg' (it takes --cpu-smoke and --dry-run)" >&2
        exit 2 ;;
    esac
done
case $DEVICE in
cuda)
    RESULTS=$ROOT/benchmarks/results/gpu_check
    CNN=${GPU_CHECK_CNN:-resnet50_trunc} VIT=${GPU_CHECK_VIT:-uni}
    SLIDES=12 COPIES=2 COSINE_SLIDES=2 EPOCHS=20 ALONE_TILES=4096 BUDGET_S=450 LIMIT_SCALE=1 ;;
cpu)  # tiny networks: a full ViT-L takes minutes per slide on two CPU cores
    RESULTS=$ROOT/benchmarks/results/gpu_check_cpu_smoke
    CNN=${GPU_CHECK_CNN:-test_resnet} VIT=${GPU_CHECK_VIT:-test_vit}
    SLIDES=6 COPIES=1 COSINE_SLIDES=1 EPOCHS=3 ALONE_TILES=256 BUDGET_S=1500 LIMIT_SCALE=3 ;;
*)
    echo "GPU_CHECK_DEVICE must be cuda or cpu, not '$DEVICE'" >&2
    exit 2 ;;
esac
BUDGET_S=${GPU_CHECK_BUDGET_S:-$BUDGET_S}
if [[ ! $BUDGET_S =~ ^[0-9]+$ ]]; then
    echo "GPU_CHECK_BUDGET_S must be whole seconds, not '$BUDGET_S'" >&2
    exit 2
fi

# the Python; on a machine without .venv (a lent GPU machine): python3, and the wheels carried in .whl/
WHEELS=$ROOT/.whl SITE=${GPU_CHECK_SITE:-/tmp/site} N_WHEELS=0
if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON PY_FROM="\$PYTHON"
elif [[ -x $ROOT/.venv/bin/python ]]; then
    PY=$ROOT/.venv/bin/python PY_FROM=.venv
else
    PY=python3 PY_FROM="python3 on PATH (no \$PYTHON, no .venv)"
    if [[ -d $WHEELS ]]; then N_WHEELS=$(find "$WHEELS" -maxdepth 1 -type f -name '*.whl' | wc -l); fi
fi
PYPATH=$ROOT
((N_WHEELS > 0)) && PYPATH=$SITE:$ROOT
PYPATH=$PYPATH${PYTHONPATH:+:$PYTHONPATH}
if ((DRY_RUN)); then  # says what a run would use; runs nothing, writes nothing
    echo "gpu_check dry run ($DEVICE mode): nothing is run or written"
    echo "python: $PY, from $PY_FROM"
    if ((N_WHEELS > 0)); then
        echo "wheels: install $N_WHEELS from $WHEELS into $SITE"
    elif [[ $PY == python3 ]]; then
        echo "wheels: none in $WHEELS (python3 must have wsi-mil's dependencies; benchmarks/gpu_wheels.sh makes them)"
    else
        echo "wheels: none installed ($PY_FROM has the dependencies)"
    fi
    echo "PYTHONPATH: $PYPATH"
    if [[ -n ${OUT:-} ]]; then
        echo "results: ${GPU_CHECK_WORK:-/tmp/wsi_mil_gpu_check.XXXXXX}/results; \$OUT ($OUT) gets gpu_check.txt," \
            "gpu_check.json, steps.tsv, heatmap_example.png, gpu_check_results.tar.gz"
    else
        echo "results: $RESULTS"
    fi
    echo "budget: $BUDGET_S s; encoders: $CNN, $VIT"
    exit 0
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/wsi_mil_gpu_check.XXXXXX)}
[[ -n ${OUT:-} ]] && RESULTS=$WORK/results
export PYTHONPATH=$PYPATH HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1
mkdir -p "$RESULTS/logs" "$WORK"
rm -f "$RESULTS"/*.json "$RESULTS"/*.csv "$RESULTS"/logs/*.log "$RESULTS"/gpu_check.txt "$RESULTS"/heatmap_example.png

FIG=(benchmarks/_run_figures.py)
WSI=("$PY" -m wsi_mil)
STEPS=$RESULTS/steps.tsv
printf 'step\tstatus\trc\tseconds\tlimit_s\tnote\n' >"$STEPS"
T0=$SECONDS
SAMPLER=
stop_sampler() {
    if [[ -n $SAMPLER ]]; then
        kill "$SAMPLER" 2>/dev/null || true
        wait "$SAMPLER" 2>/dev/null || true
        SAMPLER=
    fi
}
trap stop_sampler EXIT

# step NAME LIMIT_S NOTE CMD...: run CMD within min(LIMIT_S, the budget left), output in logs/NAME.log,
# one row of steps.tsv; always returns 0 so that later steps run.
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE)) note=$3 rc=0 status=ok left t_start t_end
    shift 3
    left=$((BUDGET_S - (SECONDS - T0)))
    if ((left < 10)); then
        printf '%s\tskipped\t\t0\t%s\t%s\n' "$name" "$limit" "time budget spent${note:+; $note}" >>"$STEPS"
        echo "[gpu_check] $name: skipped (time budget spent)"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "[gpu_check] $name (limit ${limit} s) ..."
    t_start=$EPOCHREALTIME
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$RESULTS/logs/$name.log" 2>&1 || rc=$?
    t_end=$EPOCHREALTIME
    if ((rc == 124)); then status=timeout; elif ((rc != 0)); then status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" \
        "$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.1f", b - a }')" "$limit" "$note" >>"$STEPS"
    echo "[gpu_check] $name: $status"
    publish
    return 0
}

# publish: with $OUT set, copy there what the device tool is to return (it returns at most 8 files)
publish() {
    [[ -n ${OUT:-} ]] || return 0
    mkdir -p "$OUT"
    local f
    for f in steps.tsv gpu_check.txt gpu_check.json heatmap_example.png; do
        if [[ -e $RESULTS/$f ]]; then cp -f "$RESULTS/$f" "$OUT/$f"; fi
    done
    tar -czf "$OUT/gpu_check_results.tar.gz" -C "$RESULTS" . || echo "[gpu_check] could not pack the results" >&2
    return 0
}

# sampled NAME LIMIT_S NOTE CMD...: a step with GPU utilisation sampled into util_NAME.csv while it runs
sampled() {
    local key=$1
    if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
            >"$RESULTS/util_${key#extract_}.csv" 2>/dev/null &
        SAMPLER=$!
    fi
    step "$@"
    stop_sampler
}

# where the CNN preset's weights are on this machine (hub cache, package, a file), or "no": random ones
weights_here() {
    local presets
    presets=$("$PY" -m wsi_mil encoders --json 2>"$RESULTS/logs/encoders.log") || { echo no; return 0; }
    "$PY" -c 'import json, sys
print(next((p["weights_here"] for p in json.load(sys.stdin) if p["name"] == sys.argv[1]), "no"))' "$1" \
        <<<"$presets" 2>>"$RESULTS/logs/encoders.log" || echo no
}
if ((N_WHEELS > 0)); then
    step wheels 120 "$N_WHEELS wheels from .whl into $SITE" "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --ignore-requires-python --target "$SITE" "$WHEELS"/*.whl
    step pip_check 60 "not fatal" "$PY" benchmarks/_wheels.py pip-check
fi
CNN_HERE=$(weights_here "$CNN" || echo no)
CNN_FLAGS=()
[[ $CNN_HERE == no ]] && CNN_FLAGS=(--random-init)
"$PY" - "$RESULTS/meta.json" "$PY_FROM" "$PYTHONPATH" <<EOF
import json, sys, time
json.dump({"mode": "$DEVICE", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": $BUDGET_S,
           "slides": $SLIDES, "copies": $COPIES, "cosine_slides": $COSINE_SLIDES, "epochs": $EPOCHS,
           "cnn": "$CNN", "cnn_weights": "${CNN_HERE}", "vit": "$VIT", "vit_weights": "random",
           "work": "$WORK", "python": "$PY", "python_from": sys.argv[2], "pythonpath": sys.argv[3],
           "wheels": $N_WHEELS}, open(sys.argv[1], "w"), indent=1)
EOF

step env 60 "" bash -c "{ nvidia-smi || echo 'no nvidia-smi'; } >'$RESULTS/nvidia-smi.txt' 2>&1; \
    '$PY' ${FIG[*]} env --device $DEVICE --json '$RESULTS/env.json'"

make_inputs() {  # the cohort's slides COPIES times under distinct ids; the first COSINE_SLIDES alone
    mkdir -p "$WORK/slides" "$WORK/cosine_slides"
    local i=0 c f
    for f in "$WORK"/cohort/slides/*; do
        for ((c = 0; c < COPIES; c++)); do
            ln -sf "$f" "$WORK/slides/$([[ $c == 0 ]] || echo "copy$c-")$(basename "$f")"
        done
        ((i++ < COSINE_SLIDES)) && ln -sf "$f" "$WORK/cosine_slides/"
    done
    return 0
}
step cohort 150 "$SLIDES slides x $COPIES" bash -c "${WSI[*]} -q sample-data '$WORK/cohort' --slides $SLIDES"
make_inputs

for key in cnn vit; do
    if [[ $key == cnn ]]; then enc=$CNN flags=("${CNN_FLAGS[@]}") note="weights: $CNN_HERE"
    else enc=$VIT flags=(--random-init) note="random weights"; fi
    sampled "extract_$key" 150 "$enc, $note" "${WSI[@]}" -v extract "$WORK/slides" --out "$WORK/$key" \
        --encoder "$enc" "${flags[@]}" --device "$DEVICE"
    if [[ -s $RESULTS/util_$key.csv ]]; then
        "$PY" "${FIG[@]}" util "$RESULTS/util_$key.csv" --run "$WORK/$key" --json "$RESULTS/util_$key.json" || true
    fi
    step "alone_$key" 90 "$enc" "$PY" "${FIG[@]}" encoder-alone "$WORK/$key" --tiles "$ALONE_TILES" --json "$RESULTS/alone_$key.json"
done
for key in cnn vit; do
    step "cosine_$key" 120 "$COSINE_SLIDES slides" "$PY" "${FIG[@]}" reference "$WORK/$key" "$WORK/cosine_slides" \
        --out "$WORK/${key}_cpu_fp32" --json "$RESULTS/cosine_$key.json"
done

# training on the cohort's own slide ids (not the copies), with amp_bf16 from a config file
mkdir -p "$WORK/train_in"
for f in "$WORK"/cnn/features/case*.h5; do [[ -e $f ]] && ln -sf "$f" "$WORK/train_in/"; done
printf 'training:\n  amp_bf16: true\n  epochs: %s\n' "$EPOCHS" >"$WORK/train.yaml"
step train 90 "2 folds, amp_bf16, $EPOCHS epochs" "${WSI[@]}" train "$WORK/train_in" --labels "$WORK/cohort/labels.csv" \
    --out "$WORK/train" --config "$WORK/train.yaml" --folds 2 --device "$DEVICE"
cp "$WORK/train/metrics.json" "$RESULTS/train_metrics.json" 2>/dev/null || true
step predict 60 "" "${WSI[@]}" predict "$WORK/train_in" --checkpoint "$WORK/train" --labels "$WORK/cohort/labels.csv" \
    --out "$WORK/predict" --device "$DEVICE"
step heatmap 90 "scores from predict; drawing runs on the CPU" "${WSI[@]}" heatmap "$WORK/cohort/slides" \
    --scores "$WORK/predict" --out "$WORK/heatmaps"
first_png=$(find "$WORK/heatmaps" -name heatmap.png 2>/dev/null | sort | head -n 1 || true)  # none when heatmap failed
[[ -n $first_png ]] && cp "$first_png" "$RESULTS/heatmap_example.png"

"$PY" "${FIG[@]}" summary "$RESULTS" >/dev/null || echo "[gpu_check] the summary failed" >&2
publish
echo "[gpu_check] $((SECONDS - T0)) s; results in $RESULTS (gpu_check.txt, gpu_check.json)${OUT:+, packed into $OUT}"
cat "$RESULTS/gpu_check.txt" 2>/dev/null || true
