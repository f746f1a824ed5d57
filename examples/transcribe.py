"""Transcribe media files with a saved Llama-AVSR model (full or light checkpoint, local folder or Hub id).

    python examples/transcribe.py clip.mp4 other.wav --model outputs/run_avsr/final
    python examples/transcribe.py outputs/synthetic_corpus/test/s01/*.mp4 --model outputs/run_avsr/final --batch-size 8 --json
    python examples/transcribe.py meeting.wav --model outputs/run_avsr/final --timestamps    # FILE START END TEXT lines

The same as `llama-avsr transcribe`. A long recording is cut into pieces as long as the model's training clips
(`--chunk-length` to change it, `--stride-length` to overlap them); silence gives an empty transcript. Usage errors
(missing model folder, unusable --device, --batch-size 0) are one line on stderr and exit status 2; files that cannot
be read are reported and skipped (exit status 1). In Python:

    from transformers import pipeline
    import modeling_llama_avsr  # registers the task
    asr = pipeline("audio-visual-speech-recognition", model="outputs/run_avsr/final")
    asr("clip.mp4")                               # {"text": ...}
    asr("meeting.wav", return_timestamps=True)    # {"text": ..., "chunks": [{"text", "timestamp": (start, end)}]}
"""

import argparse
import logging
import sys

from modeling_llama_avsr.pipeline_llama_avsr import add_transcribe_arguments, run_transcribe

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_transcribe_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_transcribe(parser.parse_args()))
