"""Data: the synthetic audio-visual corpus, manifest loading and lazy media decoding.

Nothing here imports espeak-ng (GPL) at import time; `tts.synthesize` loads it on first use.
"""

from .loading import (
    ManifestError,
    MediaError,
    MediaInfo,
    TranscriptError,
    align_audio_to_video,
    check_transcript,
    load_manifest,
    load_synthetic,
    probe_media,
    read_audio,
    read_audio_video,
    read_video,
)
from .lrs import LRSReport, load_lrs, read_lrs_transcript
from .preprocess import add_preprocess_arguments, run_preprocess
from .sampler import MaxFramesBatchSampler
from .synthetic import add_make_corpus_arguments, make_corpus, run_make_corpus

__all__ = [
    "LRSReport",
    "ManifestError",
    "MaxFramesBatchSampler",
    "MediaError",
    "MediaInfo",
    "TranscriptError",
    "add_make_corpus_arguments",
    "add_preprocess_arguments",
    "align_audio_to_video",
    "check_transcript",
    "load_lrs",
    "load_manifest",
    "load_synthetic",
    "make_corpus",
    "probe_media",
    "read_audio",
    "read_audio_video",
    "read_lrs_transcript",
    "read_video",
    "run_make_corpus",
    "run_preprocess",
]
