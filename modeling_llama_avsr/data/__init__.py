"""Data: the synthetic audio-visual corpus, manifest loading and lazy media decoding.

Nothing here imports espeak-ng (GPL) at import time; `tts.synthesize` loads it on first use.
"""

from .loading import MediaError, load_manifest, load_synthetic, read_audio, read_video
from .resample import resample
from .synthetic import add_make_corpus_arguments, make_corpus, run_make_corpus

__all__ = [
    "MediaError",
    "add_make_corpus_arguments",
    "load_manifest",
    "load_synthetic",
    "make_corpus",
    "read_audio",
    "read_video",
    "resample",
    "run_make_corpus",
]
