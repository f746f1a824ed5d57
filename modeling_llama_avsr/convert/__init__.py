"""Converters that turn real pretrained weights into transformers model directories, and the offline cache."""

from .gguf_llm import convert_gguf_llm, load_gguf_llm
from .offline import (
    OFFLINE_COMPONENTS,
    MissingOfflinePackageError,
    add_convert_arguments,
    convert_offline,
    default_cache_dir,
    resolve_component,
    run_convert,
)
from .whisper_ct2 import CT2FormatError, convert_whisper_ct2, read_ct2_model, whisper_from_ct2

__all__ = [
    "OFFLINE_COMPONENTS",
    "MissingOfflinePackageError",
    "CT2FormatError",
    "add_convert_arguments",
    "convert_offline",
    "default_cache_dir",
    "resolve_component",
    "run_convert",
    "convert_gguf_llm",
    "load_gguf_llm",
    "convert_whisper_ct2",
    "read_ct2_model",
    "whisper_from_ct2",
]
