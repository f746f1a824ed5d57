"""Transcribe media files with a saved Llama-AVSR model (full or light checkpoint, local folder or Hub id).

    python examples/transcribe.py clip.mp4 other.wav --model outputs/run_avsr/final
    python examples/transcribe.py outputs/synthetic_corpus/test/s01/*.mp4 --model outputs/run1/final --batch-size 8 --json

The same as `llama-avsr transcribe`. In Python:

    from transformers import pipeline
    import modeling_llama_avsr  # registers the task
    asr = pipeline("audio-visual-speech-recognition", model="outputs/run1/final")
    asr("clip.mp4")  # {"text": ...}
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
