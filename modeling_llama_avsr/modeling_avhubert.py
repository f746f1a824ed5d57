# Copyright 2025 The llama-avsr authors. Licensed under the Apache License, Version 2.0.
"""AV-HuBERT lip encoder (ResNet-18 front-end + HuBERT-style transformer), without fairseq.

Re-implements the feature path of `AVHubertModel.extract_finetune` of facebookresearch/av_hubert
(`avhubert/hubert.py`, `avhubert/resnet.py`, and fairseq's wav2vec2 `TransformerEncoder`) for video-only input,
which is how Llama-AVSR calls it (`source={"video": ..., "audio": None}`):

    video (B, 1, T, 88, 88) -> Conv3d stem + ResNet-18 trunk per frame -> (B, T, 512) -> Linear -> (B, T, d)
    audio stream: zeros (B, T, d)          [extract_finetune uses zeros, not the audio projection of zeros]
    concat [audio, video] -> LayerNorm(2d) -> post_extract_proj (2d -> d) -> dropout
    -> + conv positional embedding -> dropout -> pre-LN transformer layers -> final LayerNorm -> (B, T, d)

Differences from the fairseq code, all deliberate:
- Padding is masked: padded input frames are zeroed before the 3D stem (so the temporal kernel of the stem sees the
  same zeros as at a sequence end), padded positions are zeroed before the positional convolution and are never
  attended as keys, and `last_hidden_state` is zero at padded positions. A padded batch therefore gives the same
  outputs on real frames as each sample alone (in eval mode). The Llama-AVSR reference passes no padding mask.
  Entries of `hidden_states` at padded positions are unspecified.
- Attention uses `torch.nn.functional.scaled_dot_product_attention` (same maths as fairseq's MultiheadAttention).
- In training mode BatchNorm statistics would include padded frames; the encoder is meant to run frozen in eval mode.

Checkpoint conversion (fairseq `large_vox_iter5.pt`, `ckpt["model"]`): parameter names are the fairseq names, so the
mapping is the identity except for:

| fairseq key                                      | here                                                        |
| ------------------------------------------------ | ----------------------------------------------------------- |
| `encoder.pos_conv.0.weight_g`                    | `encoder.pos_conv.0.parametrizations.weight.original0`      |
| `encoder.pos_conv.0.weight_v`                    | `encoder.pos_conv.0.parametrizations.weight.original1`      |
| `mask_emb`, `label_embs_concat`, `final_proj.*`  | dropped (pretraining only; ignored if present on load)      |

transformers' legacy key renaming already maps `*.weight_g` / `*.weight_v` when loading, so a state dict saved with
the fairseq names also loads through `from_pretrained`. Fine-tuned AV-HuBERT checkpoints (`AVHubertSeq2Seq`) store
the same keys under the prefix `encoder.w2v_model.`; strip it (the decoder keys are dropped).
`feature_extractor_audio.proj` is kept so that every encoder weight of the checkpoint has a home, but the video-only
forward does not use it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, TokenClassifierOutput
from transformers.modeling_utils import PreTrainedModel

from .configuration_avhubert import AVHubertConfig


def _activation(relu_type: str, channels: int) -> nn.Module:
    return nn.PReLU(num_parameters=channels) if relu_type == "prelu" else nn.ReLU()


class AVHubertBasicBlock(nn.Module):
    """ResNet BasicBlock with BatchNorm and (P)ReLU; `relu1`/`relu2` are separate PReLUs as in the checkpoint."""

    def __init__(self, in_channels: int, channels: int, stride: int, relu_type: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = _activation(relu_type, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = _activation(relu_type, channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.downsample is None else self.downsample(hidden_states)
        hidden_states = self.relu1(self.bn1(self.conv1(hidden_states)))
        hidden_states = self.bn2(self.conv2(hidden_states))
        return self.relu2(hidden_states + residual)


class AVHubertResNetTrunk(nn.Module):
    """The 2D part of ResNet-18 without its stem (the 3D stem replaces it): stages `layer1`..`layer4` + global pool."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        in_channels = config.resnet_frontend_channels
        for index, (num_blocks, channels) in enumerate(zip(config.resnet_layers, config.resnet_channels)):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                block_stride = stride if block_index == 0 else 1
                blocks.append(AVHubertBasicBlock(in_channels, channels, block_stride, config.resnet_relu_type))
                in_channels = channels
            # `layer1`, `layer2`, ... are the checkpoint's names.
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.num_stages = len(config.resnet_layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for index in range(self.num_stages):
            hidden_states = getattr(self, f"layer{index + 1}")(hidden_states)
        return self.avgpool(hidden_states).flatten(1)


class AVHubertResNetEncoder(nn.Module):
    """Lip front-end: 3D convolutional stem over (time, height, width), then a 2D ResNet applied to every frame."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        channels = config.resnet_frontend_channels
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, channels, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(channels),
            _activation(config.resnet_relu_type, channels),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = AVHubertResNetTrunk(config)

    def forward(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        batch_size, _, num_frames = pixel_values_videos.shape[:3]
        hidden_states = self.frontend3D(pixel_values_videos)  # (B, C, T, H', W'); the stem keeps T
        # Frames are folded into the batch: the trunk is purely per-frame.
        hidden_states = hidden_states.transpose(1, 2).flatten(0, 1)
        hidden_states = self.trunk(hidden_states)
        return hidden_states.view(batch_size, num_frames, -1)


class AVHubertVideoFeatureExtractor(nn.Module):
    """fairseq `SubModel` for video: ResNet + linear projection to the transformer width. Returns (B, T, d)."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        self.resnet = AVHubertResNetEncoder(config)
        self.proj = nn.Linear(config.video_feat_dim, config.hidden_size)

    def forward(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        return self.proj(self.resnet(pixel_values_videos))


class AVHubertAudioFeatureExtractor(nn.Module):
    """fairseq `SubModel` for audio (stacked filterbanks -> d). Kept for checkpoint fidelity; unused video-only."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        self.proj = nn.Linear(config.audio_feat_dim, config.hidden_size)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.proj(input_features)


class AVHubertSamePad(nn.Module):
    """Drops the extra last frame that an even kernel with padding k // 2 produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.num_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., : hidden_states.shape[-1] - self.num_remove]


class AVHubertPositionalConvEmbedding(nn.Sequential):
    """Grouped, weight-normalised Conv1d + SamePad + GELU; a Sequential so the conv is `pos_conv.0` as in fairseq."""

    def __init__(self, config: AVHubertConfig):
        conv = nn.Conv1d(
            config.hidden_size,
            config.hidden_size,
            kernel_size=config.conv_pos,
            padding=config.conv_pos // 2,
            groups=config.conv_pos_groups,
        )
        # dim=2: one norm per kernel tap, as fairseq's `weight_norm(..., dim=2)` (weight_g has shape (1, 1, k)).
        conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        super().__init__(conv, AVHubertSamePad(config.conv_pos), nn.GELU())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.transpose(1, 2)).transpose(1, 2)


class AVHubertAttention(nn.Module):
    """fairseq MultiheadAttention (self-attention only), computed with SDPA."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        # Creation order k, v, q, out as in fairseq, so the state dict lists them in the same order.
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, seq_len, hidden_size = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attn_output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0
        )
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, seq_len, hidden_size)
        return self.out_proj(attn_output)


class AVHubertEncoderLayer(GradientCheckpointingLayer):
    """fairseq TransformerSentenceEncoderLayer (pre-LN when `layer_norm_first`)."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        self.layer_norm_first = config.layer_norm_first
        self.self_attn = AVHubertAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_dropout(self.activation_fn(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden_states))

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_norm_first:
            attn_output = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask)
            hidden_states = hidden_states + self.dropout(attn_output)
            return hidden_states + self._feed_forward(self.final_layer_norm(hidden_states))
        attn_output = self.self_attn(hidden_states, attention_mask)
        hidden_states = self.self_attn_layer_norm(hidden_states + self.dropout(attn_output))
        return self.final_layer_norm(hidden_states + self._feed_forward(hidden_states))


class AVHubertEncoder(nn.Module):
    """fairseq wav2vec2 TransformerEncoder: conv positional embedding, layers (with layerdrop), LayerNorm."""

    def __init__(self, config: AVHubertConfig):
        super().__init__()
        self.layer_norm_first = config.layer_norm_first
        self.layerdrop = config.layerdrop
        self.pos_conv = AVHubertPositionalConvEmbedding(config)
        self.layers = nn.ModuleList([AVHubertEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutput:
        sdpa_mask = None
        if attention_mask is not None:
            # Zeroed padding makes the positional convolution see what a shorter sequence sees at its end.
            hidden_states = hidden_states.masked_fill(~attention_mask[..., None], 0.0)
            sdpa_mask = attention_mask[:, None, None, :]  # (B, 1, 1, T): True = may be attended

        hidden_states = hidden_states + self.pos_conv(hidden_states)
        if not self.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(hidden_states)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # LayerDrop (https://huggingface.co/papers/1909.11556); a CPU draw, so no device synchronisation.
            if self.training and self.layerdrop > 0 and torch.rand([]).item() < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, sdpa_mask)

        if self.layer_norm_first:
            hidden_states = self.layer_norm(hidden_states)
        if output_hidden_states:
            # As in transformers' text models: the last entry is the output of the last layer after the final norm.
            all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class AVHubertPreTrainedModel(PreTrainedModel):
    config: AVHubertConfig
    config_class = AVHubertConfig
    base_model_prefix = "avhubert"
    main_input_name = "pixel_values_videos"
    input_modalities = "video"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["AVHubertEncoderLayer", "AVHubertResNetEncoder"]
    # Pretraining-only tensors of the fairseq checkpoint; tolerated (and dropped) if a raw state dict is loaded.
    _keys_to_ignore_on_load_unexpected = [r"mask_emb$", r"label_embs_concat$", r"final_proj\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        if isinstance(module, AVHubertPositionalConvEmbedding):
            # fairseq: normal with std sqrt(4 / (k * d)) for the direction v, and g = |v| so that weight = v at init.
            conv = module[0]
            weight_g = conv.parametrizations.weight.original0
            weight_v = conv.parametrizations.weight.original1
            init.normal_(weight_v, mean=0.0, std=math.sqrt(4.0 / (conv.kernel_size[0] * conv.in_channels)))
            init.copy_(weight_g, torch.linalg.vector_norm(weight_v, dim=(0, 1), keepdim=True))
            init.zeros_(conv.bias)
        elif isinstance(module, nn.Conv1d) and hasattr(module, "parametrizations"):
            pass  # its weight is derived; initialised through AVHubertPositionalConvEmbedding above
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            # fairseq's ResNet init: normal(0, sqrt(2 / fan_out)).
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.PReLU):
            init.constant_(module.weight, 0.25)
        else:
            super()._init_weights(module)


class AVHubertModel(AVHubertPreTrainedModel):
    r"""
    AV-HuBERT encoder for lip video. Input: (B, 1, T, 88, 88) normalised grayscale mouth crops at 25 fps.
    Output: (B, T, hidden_size), the output of the last layer after the final LayerNorm, at 25 Hz.
    """

    def __init__(self, config: AVHubertConfig):
        super().__init__(config)
        self.feature_extractor_audio = AVHubertAudioFeatureExtractor(config)
        self.feature_extractor_video = AVHubertVideoFeatureExtractor(config)
        fused_size = 2 * config.hidden_size if config.modality_fusion == "concat" else config.hidden_size
        # The LayerNorm acts on the fused features, before the projection back to the transformer width.
        self.layer_norm = nn.LayerNorm(fused_size, eps=config.layer_norm_eps)
        self.post_extract_proj = (
            nn.Linear(fused_size, config.hidden_size) if fused_size != config.hidden_size else None
        )
        self.dropout_input = nn.Dropout(config.feat_proj_dropout)
        self.encoder = AVHubertEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values_videos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        r"""
        pixel_values_videos (`torch.FloatTensor` of shape `(batch_size, 1, num_frames, height, width)`):
            Normalised grayscale mouth crops (88 x 88 for the released checkpoints).
        attention_mask (`torch.Tensor` of shape `(batch_size, num_frames)`, *optional*):
            1/True for real frames, 0/False for padding. Padded frames never influence real ones and the output is
            zero there.

        Returns: `BaseModelOutput` with `last_hidden_state` (B, T, hidden_size) and, if asked, `hidden_states`: the
        encoder input (after the positional convolution), then the output of every layer, the last one after the
        final LayerNorm (num_hidden_layers + 1 entries).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            # The 3D stem has a temporal kernel of 5: zeroed padding equals the stem's own zero padding.
            pixel_values_videos = pixel_values_videos.masked_fill(~attention_mask[:, None, :, None, None], 0.0)

        features_video = self.feature_extractor_video(pixel_values_videos)
        # Video-only input: fairseq's extract_finetune fills the absent audio stream with zeros (audio first).
        features_audio = torch.zeros_like(features_video)
        if self.config.modality_fusion == "concat":
            features = torch.cat([features_audio, features_video], dim=-1)
        else:
            features = features_audio + features_video
        features = self.layer_norm(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        features = self.dropout_input(features)

        outputs = self.encoder(features, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        if attention_mask is not None:
            outputs.last_hidden_state = outputs.last_hidden_state.masked_fill(~attention_mask[..., None], 0.0)
        return outputs if return_dict else outputs.to_tuple()


class AVHubertForFrameClassification(AVHubertPreTrainedModel):
    r"""
    AV-HuBERT with a linear classifier on every 25 Hz frame, like `HubertForSequenceClassification`'s frame-level
    cousin `Wav2Vec2ForAudioFrameClassification`. AV-HuBERT itself is pretrained by predicting a cluster id per frame;
    a frame classifier trained on visible labels (e.g. visemes) is the supervised analogue, which is how the offline
    default gets a lip encoder without released weights (`examples/pretrain_lip_encoder.py`). `self.avhubert` is a
    plain `AVHubertModel`: save it on its own to use it as LlamaAVSR's video encoder.
    """

    def __init__(self, config: AVHubertConfig):
        super().__init__(config)
        # transformers' per-token cross-entropy, which honours Trainer's `num_items_in_batch` (exact gradient
        # accumulation and data parallelism); the class name alone would not select it.
        self.loss_type = "ForTokenClassification"
        self.avhubert = AVHubertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values_videos: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, num_frames)`, *optional*):
            Class per frame; -100 (e.g. at padding) is ignored. The loss is the mean cross-entropy over labelled
            frames, or their sum divided by `num_items_in_batch` when Trainer passes it.
        """
        hidden = self.avhubert(pixel_values_videos, attention_mask=attention_mask, return_dict=True).last_hidden_state
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits)


__all__ = ["AVHubertPreTrainedModel", "AVHubertModel", "AVHubertForFrameClassification"]
