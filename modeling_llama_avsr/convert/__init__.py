"""Converters that turn real pretrained weights into transformers model directories, and the offline cache."""

from .avhubert_fairseq import (
    RestrictedUnpickler,
    UnsafeCheckpointError,
    avhubert_config_from_fairseq,
    convert_avhubert_fairseq,
    load_fairseq_checkpoint,
)
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
from .reference_ckpt import convert_reference_checkpoint, load_reference_state_dict
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
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "avhubert_config_from_fairseq",
    "convert_avhubert_fairseq",
    "load_fairseq_checkpoint",
    "convert_reference_checkpoint",
    "load_reference_state_dict",
]
