# Copyright 2025 The llama-avsr authors. Licensed under the Apache License, Version 2.0.
"""AV-HuBERT configuration (the lip encoder of Llama-AVSR).

Field names follow the transformers audio encoders (Hubert, Wav2Vec2); the fairseq names of the original
AV-HuBERT code (`encoder_embed_dim`, `encoder_layers`, ...) are accepted as aliases through `attribute_map`, so
a fairseq `cfg.model` can be passed through almost unchanged by a converter.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


@strict
class AVHubertConfig(PreTrainedConfig):
    r"""
    Configuration of [`AVHubertModel`]: a ResNet-18 lip front-end followed by a HuBERT-style transformer encoder,
    as in AV-HuBERT (Shi et al., 2022, facebookresearch/av_hubert). The defaults build AV-HuBERT **Large**
    (`large_vox_iter5.pt`, the video encoder of Llama-AVSR): 24 pre-LN layers, d=1024, FFN 4096, 16 heads,
    convolutional positional embedding with kernel 128 and 16 groups, "concat" modality fusion.

    AV-HuBERT **Base** (`base_vox_iter5.pt`) differs only in the transformer size: 12 layers, d=768, FFN 3072,
    12 heads (`AVHubertConfig.base()`).

    Args:
        hidden_size (`int`, defaults to 1024):
            Transformer width (fairseq `encoder_embed_dim`); also the width of each modality's feature projection.
        num_hidden_layers (`int`, defaults to 24):
            Number of transformer layers (fairseq `encoder_layers`).
        num_attention_heads (`int`, defaults to 16):
            Attention heads per layer (fairseq `encoder_attention_heads`).
        intermediate_size (`int`, defaults to 4096):
            Feed-forward width (fairseq `encoder_ffn_embed_dim`).
        hidden_act (`str`, defaults to `"gelu"`):
            Feed-forward activation (exact, erf-based GELU as in fairseq).
        hidden_dropout (`float`, defaults to 0.1):
            Dropout on the attention and feed-forward outputs and on the encoder input (fairseq `dropout`).
        attention_dropout (`float`, defaults to 0.1):
            Dropout on the attention probabilities.
        activation_dropout (`float`, defaults to 0.0):
            Dropout after the feed-forward activation.
        feat_proj_dropout (`float`, defaults to 0.1):
            Dropout after `post_extract_proj` (fairseq `dropout_input`).
        layerdrop (`float`, defaults to 0.05):
            Probability of skipping a whole transformer layer, in training mode only (fairseq `encoder_layerdrop`).
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm.
        layer_norm_first (`bool`, defaults to `True`):
            Pre-LN layers plus a final LayerNorm (True for both released Base and Large); False gives post-LN layers
            with the LayerNorm applied to the encoder input instead.
        conv_pos (`int`, defaults to 128):
            Kernel size of the convolutional positional embedding.
        conv_pos_groups (`int`, defaults to 16):
            Groups of the convolutional positional embedding.
        resnet_relu_type (`str`, defaults to `"prelu"`):
            Activation of the ResNet front-end, `"prelu"` (released checkpoints) or `"relu"`.
        resnet_frontend_channels (`int`, defaults to 64):
            Output channels of the 3D convolutional stem.
        resnet_layers (`list[int]`, defaults to `[2, 2, 2, 2]`):
            BasicBlocks per ResNet stage (ResNet-18).
        resnet_channels (`list[int]`, defaults to `[64, 128, 256, 512]`):
            Width of each ResNet stage; the last one is the per-frame video feature size (512).
        modality_fusion (`str`, defaults to `"concat"`):
            How the audio and video streams are fused (fairseq `modality_fuse`): `"concat"` (released checkpoints,
            followed by a 2 * hidden_size -> hidden_size `post_extract_proj`) or `"add"`.
        audio_feat_dim (`int`, defaults to 104):
            Input size of the audio stream (26 log filterbanks x 4 stacked frames). Only the size of the kept audio
            projection; the video-only forward feeds the audio stream with zeros.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of linear layers.

    Example:

    ```python
    >>> from modeling_llama_avsr import AVHubertConfig, AVHubertModel

    >>> config = AVHubertConfig()  # AV-HuBERT Large
    >>> model = AVHubertModel(config)
    ```
    """

    model_type = "avhubert"
    # fairseq names of the same fields, so a fairseq `cfg.model` maps onto this config without renaming.
    attribute_map = {
        "encoder_embed_dim": "hidden_size",
        "encoder_layers": "num_hidden_layers",
        "encoder_attention_heads": "num_attention_heads",
        "encoder_ffn_embed_dim": "intermediate_size",
        "encoder_layerdrop": "layerdrop",
        "dropout_input": "feat_proj_dropout",
        "modality_fuse": "modality_fusion",
    }

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    hidden_dropout: float | int = 0.1
    attention_dropout: float | int = 0.1
    activation_dropout: float | int = 0.0
    feat_proj_dropout: float | int = 0.1
    layerdrop: float | int = 0.05
    layer_norm_eps: float = 1e-5
    layer_norm_first: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    resnet_relu_type: str = "prelu"
    resnet_frontend_channels: int = 64
    resnet_layers: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    resnet_channels: list[int] | tuple[int, ...] = (64, 128, 256, 512)
    modality_fusion: str = "concat"
    audio_feat_dim: int = 104
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Lists survive the JSON round trip unchanged, tuples would come back as lists.
        self.resnet_layers = list(self.resnet_layers)
        self.resnet_channels = list(self.resnet_channels)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict`-powered validation."""
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.hidden_size % self.conv_pos_groups != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by conv_pos_groups ({self.conv_pos_groups})."
            )
        if len(self.resnet_layers) != len(self.resnet_channels):
            raise ValueError(
                f"resnet_layers ({self.resnet_layers}) and resnet_channels ({self.resnet_channels}) must have the "
                "same length (one entry per ResNet stage)."
            )
        if self.modality_fusion not in ("concat", "add"):
            raise ValueError(f"modality_fusion must be 'concat' or 'add', got {self.modality_fusion!r}.")
        if self.resnet_relu_type not in ("prelu", "relu"):
            raise ValueError(f"resnet_relu_type must be 'prelu' or 'relu', got {self.resnet_relu_type!r}.")

    @property
    def video_feat_dim(self) -> int:
        """Per-frame size of the ResNet output (512 for ResNet-18)."""
        return self.resnet_channels[-1]

    @classmethod
    def base(cls, **kwargs) -> "AVHubertConfig":
        """AV-HuBERT Base: 12 layers, d=768, FFN 3072, 12 heads; everything else as Large."""
        sizes = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
        return cls(**{**sizes, **kwargs})


__all__ = ["AVHubertConfig"]
