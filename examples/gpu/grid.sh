#!/usr/bin/env bash
# The reproduction grid on one GPU, as run on the lent H200 (RESULTS.md, "Reproduction"): the synthetic corpus made
# once on the machine's cores, then the ASR cells and the video cells side by side. Small runs are bound by kernel
# launches on the host, so several share the GPU well (4 processes gave 3.4x one); the ASR cells need no lip
# encoder, so they start while it pretrains.
#
#   bash examples/gpu/grid.sh OUT HOURS [ASR_WORKERS VIDEO_WORKERS]
#
# A rerun skips the cells that have a result file. HOURS: no new cell starts after this long (running ones finish).
set -euo pipefail
OUT=${1:?usage: grid.sh OUT HOURS [ASR_WORKERS VIDEO_WORKERS]}
HOURS=${2:?usage: grid.sh OUT HOURS [ASR_WORKERS VIDEO_WORKERS]}
ASR_WORKERS=${3:-4}
VIDEO_WORKERS=${4:-4}
CORPUS=${CORPUS:-/tmp/corpus}
# Nine runs on 16 cores: with torch's default of one thread per core each, the host's load reached 36 and the runs
# were bound by it (2026-12-01); two threads per run leave the cores to the launches and the data loaders.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

# Every cell's run_avsr.py flags: the original's 30-s Whisper window (a clip's features do not depend on its batch
# partners), fp32 as on the CPU, compiled decoder layers with token lengths in steps of 16.
CELL_ARGS=(--data_dir "$CORPUS" --audio_window full --dtype float32 --compile_decoder_layers true
           --pad_to_multiple_of 16 --dataloader_num_workers 1 --per_device_eval_batch_size 64)

python3 -m modeling_llama_avsr.cli make-corpus --out "$CORPUS" --num-train 1200 --num-validation 50 --num-test 200 \
    --seed 0 --workers 16 >"$OUT/corpus.log" 2>&1

python3 reproduce_paper.py --out "$OUT" --workers "$ASR_WORKERS" --hours "$HOURS" --no-extra-seeds \
    --settings asr-32 asr-4 asr-16 -- "${CELL_ARGS[@]}" >"$OUT/asr.log" 2>&1 &
python3 reproduce_paper.py --out "$OUT" --workers "$VIDEO_WORKERS" --hours "$HOURS" --no-extra-seeds \
    --settings avsr-16-5 vsr-5 avsr-4-2 avsr-1-1 vsr-1 --lip-args "--data_dir $CORPUS" \
    -- "${CELL_ARGS[@]}" >"$OUT/video.log" 2>&1 &
wait
python3 reproduce_paper.py --out "$OUT" --report >"$OUT/report.log" 2>&1
