"""Checkpoints of the original Llama-AVSR code (umbertocappellazzo/Llama-AVSR) -> `LlamaAVSRForConditionalGeneration`.

    model, processor = convert_reference_checkpoint(
        "model_avg_4.pth", text_model="meta-llama/Llama-3.2-3B", audio_encoder="openai/whisper-medium.en",
        lora_scaling=0.125, output_dir="llama-avsr-asr")

The original saves the whole `AVSR_LLMs` module: a Lightning `epoch=N.ckpt` ({"state_dict": {"model.<key>": ...}},
with the run's arguments pickled next to it) or the averaged `model_avg_K.pth` (the bare state dict). Its keys:

| original                                             | here                                                      |
| ---------------------------------------------------- | --------------------------------------------------------- |
| `audio_proj.0.*`, `audio_proj.2.*` (`video_proj.*`)  | `model.audio_projector.linear_1.*`, `.linear_2.*` (video) |
| `audio_proj.3.*` (`--layernorm-projector`)           | `model.audio_projector.layer_norm.*`                      |
| `audio_encoder.*` (transformers WhisperEncoder)       | `model.audio_encoder.*`                                   |
| `video_encoder.*` (fairseq AV-HuBERT)                 | `model.video_encoder.*` (see `avhubert_fairseq`)          |
| `llm.model.*`, `llm.lm_head.weight`                  | `model.language_model.*`, `lm_head.weight`                |
| `llm.model.layers.i.self_attn.lora_down_Q.weight`    | `...q_proj.lora_A.default.weight` (`lora_up_Q` -> lora_B) |
| `llm.model.layers.i.self_attn.lora_down_V.weight`    | `...v_proj.lora_A.default.weight` (`lora_up_V` -> lora_B) |

LoRA: the original's `--reduction_lora R` is a reduction factor, not a rank: the rank is round(hidden / R) and the
update is `up(down(x)) * alpha / R`. So for Llama 3.2-3B (hidden 3072, R = 32, alpha 4) the rank is 96 and the
scaling 0.125. The rank is read from the tensors; the scaling is not stored and must be given (`lora_scaling`).
PEFT scales by lora_alpha / rank, so lora_alpha = scaling * rank; when that is not an integer, lora_alpha = rank and
the scaling is folded into lora_B.

Vocabulary: the original appends `<pad> <audio> </audio> <video> </video>` to the tokenizer, in that order. Their
rows (random, never trained) are copied to our ids of the same markers; `<pad>` is dropped (we pad with EOS, masked)
and our placeholder rows get the mean embedding (they are replaced by encoder features and never read).

Averaged checkpoints: the original's averaging script (`utils/avg_checkpoints_original.py`) sums the state dicts in
place into the first one, where the tied embedding / LM-head tensor appears under two keys: it is added twice per
checkpoint and divided twice, leaving it at (2N - 1) / N^2 of its value (0.19 for N = 10). Those rows are frozen, so
with `base_model` (the LLM the run started from, usually `text_model`) the converter compares them with the base,
warns about a mismatch, restores the base rows, and divides the added markers' rows by the same measured factor.

What the converter sets so that the model sees its inputs as the original built them: `partial_window="drop"` (the
original's AvgPool1d and stacking drop a clip's partial last window) and, in the processor,
`transcript_leading_space=False` (the original tokenises the bare transcript). Behaviour that still differs: see
`modeling_llama_avsr` (padding is masked, Whisper's output is cut at the real length of each clip instead of
max(len / 16000 * 50, 25) frames of the batch's longest).
"""

import logging

import torch

from ..configuration_llama_avsr import DEFAULT_PROMPTS, LlamaAVSRConfig, resolve_component
from ..modeling_llama_avsr import LlamaAVSRForConditionalGeneration, _generation_config
from ..processing_llama_avsr import LlamaAVSRProcessor
from ..tokenization_llama_avsr import load_component_tokenizer
from .avhubert_fairseq import avhubert_config_from_fairseq, fairseq_encoder_state, restricted_pickle

logger = logging.getLogger(__name__)

REFERENCE_ADDED_TOKENS = ("<pad>", "<audio>", "</audio>", "<video>", "</video>")
_LORA_NAMES = {"lora_down_Q": "q_proj.lora_A.default", "lora_up_Q": "q_proj.lora_B.default",
               "lora_down_V": "v_proj.lora_A.default", "lora_up_V": "v_proj.lora_B.default"}


def _read_checkpoint(checkpoint) -> dict:
    # The restricted unpickler: Lightning pickles the run's argparse arguments next to the weights, which
    # `weights_only=True` refuses.
    if isinstance(checkpoint, dict):
        return checkpoint
    return torch.load(checkpoint, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)


def load_reference_state_dict(checkpoint) -> dict:
    """A path to `epoch=N.ckpt` / `model_avg_K.pth`, or an already loaded dict -> the bare `AVSR_LLMs` state dict."""
    checkpoint = _read_checkpoint(checkpoint)
    if "state_dict" in checkpoint:
        checkpoint = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if not any(k.startswith("llm.") for k in checkpoint):
        raise ValueError("not a Llama-AVSR checkpoint: no 'llm.*' weights")
    return checkpoint


def _lora_settings(state: dict, lora_scaling):
    ranks = {v.shape[0] for k, v in state.items() if k.endswith(("lora_down_Q.weight", "lora_down_V.weight"))}
    if not ranks:
        return 0, 1, 1.0
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ across layers: {sorted(ranks)}")
    if lora_scaling is None:
        raise ValueError(
            "The checkpoint has LoRA weights, whose scaling (the original's alpha / reduction_lora) is not stored: "
            "pass lora_scaling (0.125 for the published Llama 3.2-3B runs: reduction 32, alpha 4)."
        )
    rank = ranks.pop()
    alpha = lora_scaling * rank
    if abs(alpha - round(alpha)) < 1e-6:
        return rank, int(round(alpha)), 1.0
    return rank, rank, lora_scaling  # PEFT scale 1; the scaling goes into lora_B


def _stack_rate(projector_in: int, encoder_dim: int, what: str) -> int:
    if projector_in % encoder_dim:
        raise ValueError(f"{what} projector input {projector_in} is not a multiple of the encoder width {encoder_dim}")
    return projector_in // encoder_dim


def convert_reference_checkpoint(
    checkpoint,
    text_model: str,
    audio_encoder: str | None = None,
    lora_scaling: float | None = None,
    video_config=None,
    compression_type: str = "stack",
    audio_compression_rate: int | None = None,
    video_compression_rate: int | None = None,
    prompt: str | None = None,
    reference_added_tokens=REFERENCE_ADDED_TOKENS,
    base_model: str | None = None,
    output_dir=None,
):
    """Returns (model, processor) holding the original's weights.

    text_model: the base LLM the checkpoint was trained from (id, folder or offline name): its config and tokenizer
        are read, its weights are not (the checkpoint holds them). audio_encoder: the Whisper model the original used
        (config and feature extractor only), for ASR/AVSR. video_config: AV-HuBERT config; by default from the
        tensor shapes (heads: 12 for d=768, 16 for d=1024). compression_type: the ICASSP release stacks frames and
        the rates are then read from the projector shapes; for "avg" (the sink paper's code) pass the rates.
    base_model: the LLM the run started from (id, folder or offline name; usually `text_model`), whose embedding and
        LM-head rows the original kept frozen: they are checked against the checkpoint's and restored (see the
        averaging note above). None: not checked (a warning for averaged tied checkpoints says so).
    """
    raw = _read_checkpoint(checkpoint)
    state = load_reference_state_dict(raw)
    uses_audio, uses_video = "audio_proj.0.weight" in state, "video_proj.0.weight" in state
    modality = {(True, True): "avsr", (True, False): "asr", (False, True): "vsr"}.get((uses_audio, uses_video))
    if modality is None:
        raise ValueError("the checkpoint has neither audio_proj nor video_proj weights")
    if uses_audio and audio_encoder is None:
        raise ValueError("an ASR/AVSR checkpoint needs audio_encoder (the Whisper model it was trained with)")

    from transformers import AutoConfig, GenerationConfig

    tokenizer, token_ids = load_component_tokenizer(text_model)
    text_config = AutoConfig.from_pretrained(resolve_component(text_model))
    base_vocab = text_config.vocab_size
    embeddings = state["llm.model.embed_tokens.weight"]
    if embeddings.shape[0] != base_vocab + len(reference_added_tokens):
        raise ValueError(
            f"the checkpoint's vocabulary has {embeddings.shape[0]} rows, expected {base_vocab} ({text_model}) + "
            f"{len(reference_added_tokens)} added tokens: is text_model the LLM it was trained from?"
        )
    text_config.vocab_size = len(tokenizer)
    audio_config = AutoConfig.from_pretrained(resolve_component(audio_encoder)) if uses_audio else None
    if uses_video and video_config is None:
        video_config = avhubert_config_from_fairseq(
            {"model": {k[len("video_encoder."):]: v for k, v in state.items() if k.startswith("video_encoder.")}}
        )
    rates = {"audio": audio_compression_rate, "video": video_compression_rate}
    if compression_type == "stack":
        if uses_audio and rates["audio"] is None:
            rates["audio"] = _stack_rate(state["audio_proj.0.weight"].shape[1], audio_config.d_model, "audio")
        if uses_video and rates["video"] is None:
            rates["video"] = _stack_rate(state["video_proj.0.weight"].shape[1], video_config.hidden_size, "video")
    elif None in [rates[m] for m, used in (("audio", uses_audio), ("video", uses_video)) if used]:
        raise ValueError("with compression_type='avg' the rates cannot be read from the weights: pass them")
    rank, alpha, fold = _lora_settings(state, lora_scaling)
    projector = state["audio_proj.0.weight" if uses_audio else "video_proj.0.weight"].shape[0]
    layer_norm = f"{'audio' if uses_audio else 'video'}_proj.3.weight" in state
    if base_model is not None:
        state = _restore_frozen_rows(state, base_model, base_vocab)
    elif "state_dict" not in raw and getattr(text_config, "tie_word_embeddings", False):
        logger.warning(
            "An averaged checkpoint (no Lightning 'state_dict') of an LLM with tied embeddings: the original's "
            "averaging script leaves the tied rows at (2N - 1) / N^2 of their value. Pass base_model=%r to check "
            "and restore them.", str(text_model),
        )

    config = LlamaAVSRConfig(
        text_config=text_config,
        audio_config=audio_config,
        video_config=video_config,
        modality=modality,
        compression_type=compression_type,
        audio_compression_rate=rates["audio"] or 1,
        video_compression_rate=rates["video"] or 1,
        partial_window="drop",
        projector_hidden_size=projector,
        projector_layer_norm=layer_norm,
        prompt=prompt or DEFAULT_PROMPTS[modality],
        lora_rank=rank,
        lora_alpha=alpha,
        lora_target_modules=["q_proj", "v_proj"],
        **token_ids,
    )
    config.base_components = {"text_model": str(text_model), "audio_encoder": audio_encoder,
                              "video_encoder": None, "text_vocab_size": base_vocab}
    model = LlamaAVSRForConditionalGeneration(config)
    ours = _map_state(state, model, tokenizer, base_vocab, reference_added_tokens, fold)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    try:
        base_generation = GenerationConfig.from_pretrained(resolve_component(text_model))
    except OSError:
        base_generation = GenerationConfig()
    model.generation_config = _generation_config(base_generation, tokenizer, token_ids)
    model._set_trainable()
    model.eval()

    processor = LlamaAVSRProcessor.from_components(
        text_model, audio_encoder, modality=modality, prompt=config.prompt,
        audio_compression_rate=config.audio_compression_rate, video_compression_rate=config.video_compression_rate,
        partial_window=config.partial_window, transcript_leading_space=False,
    )
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return model, processor


def _restore_frozen_rows(state: dict, base_model: str, base_vocab: int) -> dict:
    """The checkpoint's embedding and LM-head tensors with their first `base_vocab` rows (frozen in the original) taken
    from `base_model`. Rows scaled by a common factor (the averaging script's (2N - 1) / N^2) are reported, and the
    added markers' rows, scaled alike, are divided by it. Rows that differ otherwise mean another base: an error."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_component(base_model), dtype="auto")
    references = {"llm.model.embed_tokens.weight": base.get_input_embeddings().weight.detach(),
                  "llm.lm_head.weight": base.get_output_embeddings().weight.detach()}
    state = dict(state)  # new tensors, never in place: the two keys may share one storage
    for key, reference in references.items():
        if key not in state:
            continue
        value = state[key]
        if reference.shape[0] != base_vocab or reference.shape[1] != value.shape[1]:
            raise ValueError(f"{base_model}: {key} is {tuple(reference.shape)}, the checkpoint's base rows are "
                             f"({base_vocab}, {value.shape[1]}): not the LLM the checkpoint was trained from")
        rows, reference = value[:base_vocab].flatten().float(), reference.flatten().float()
        scale = float(torch.dot(rows, reference) / torch.dot(reference, reference))
        residual = float((rows - scale * reference).norm() / rows.norm().clamp(min=1e-30))
        reference = reference.view(base_vocab, -1)
        if residual > 0.02:
            raise ValueError(f"{key}: the checkpoint's first {base_vocab} rows are not those of {base_model} (nor a "
                             f"multiple of them; relative residual {residual:.3f}): not the LLM it was trained from")
        restored = value.clone()
        restored[:base_vocab] = reference.to(value.dtype)
        if abs(scale - 1) > 0.01:
            averaged = (1 + (1 - scale) ** 0.5) / scale if 0 < scale < 1 else float("nan")  # (2N - 1) / N^2 = scale
            logger.warning(
                "%s: the frozen rows are %.4f times those of %s (the original's averaging script leaves a tied "
                "embedding at (2N - 1) / N^2 of its value: N = %.2f). Restored from the base; the %d added rows "
                "are divided by %.4f.", key, scale, base_model, averaged, value.shape[0] - base_vocab, scale,
            )
            restored[base_vocab:] = value[base_vocab:] / scale
        state[key] = restored
    return state


def _map_state(state, model, tokenizer, base_vocab, reference_added_tokens, fold):
    ours = {}
    for key, value in state.items():
        if key.startswith(("audio_proj.", "video_proj.")):
            stream, index, leaf = key.split(".", 2)
            layer = {"0": "linear_1", "2": "linear_2", "3": "layer_norm"}[index]
            ours[f"model.{stream.replace('_proj', '_projector')}.{layer}.{leaf}"] = value
        elif key.startswith("audio_encoder."):
            ours["model." + key] = value
        elif key.startswith("llm.model."):
            name = "model.language_model." + key[len("llm.model."):]
            stem, _, leaf = name.rpartition(".")
            module = stem.rsplit(".", 1)[-1]
            if module in _LORA_NAMES:
                name = f"{stem.rsplit('.', 1)[0]}.{_LORA_NAMES[module]}.{leaf}"
                if module.startswith("lora_up") and fold != 1.0:
                    value = value * fold
            elif module in ("q_proj", "v_proj"):
                name = f"{stem}.base_layer.{leaf}"
            ours[name] = value
        elif key == "llm.lm_head.weight":
            ours["lm_head.weight"] = value
    video = {k[len("video_encoder."):]: v for k, v in state.items() if k.startswith("video_encoder.")}
    ours.update({"model.video_encoder." + k: v for k, v in fairseq_encoder_state(video).items()})

    # Rows: the base vocabulary as is, the original's markers to our ids of the same strings, the mean elsewhere.
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name not in ours:
            continue
        original = ours[name]
        rows = original[:base_vocab].mean(0, keepdim=True).repeat(len(tokenizer), 1)
        rows[:base_vocab] = original[:base_vocab]
        vocab = tokenizer.get_vocab()
        for offset, token in enumerate(reference_added_tokens):
            if token in vocab and vocab[token] >= base_vocab:
                rows[vocab[token]] = original[base_vocab + offset]
        ours[name] = rows
    return ours


__all__ = ["REFERENCE_ADDED_TOKENS", "convert_reference_checkpoint", "load_reference_state_dict"]
