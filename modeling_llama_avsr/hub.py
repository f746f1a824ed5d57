"""Sharing a trained model: full and light checkpoints, a generated model card, and the Hub upload.

Two checkpoint kinds, both loaded by `LlamaAVSRForConditionalGeneration.from_pretrained` (the loading lives in the
modeling file, below this one) (and by
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` without this package):

- full: `model.save_pretrained`: every weight (LLM, encoders, projectors, LoRA).
- light: only what training changed. `config.json` is the full config plus `light_checkpoint: true` and
  `base_components` (the text model, audio encoder and video encoder as Hub ids, local folders or offline names);
  `light_model.safetensors` holds the projectors, the LoRA matrices, any encoder that was trained (not frozen) or has
  no pretrained source, and the embedding rows that the vocabulary grew by. Those rows (markers and placeholders)
  are not trained but are drawn at random when the base is composed (`added_tokens_init` says how), so
  they are saved to make the reload exact; they cost (added tokens x hidden size) numbers. Loading composes the base
  with `from_components` and then loads these tensors; pass `base_components={...}` to `from_pretrained` to point at
  other copies of the parts (for instance, Hub ids where the offline names of this package are not available).

`push_to_hub` writes either kind with the processor, a README model card and the pipeline code into a temporary
folder (`save_for_hub`, which is what the tests check offline) and uploads that folder in one commit.

This module stands above the model and the pipeline (it saves both); nothing below it imports it.
"""

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configuration_llama_avsr import resolve_component
from .modeling_llama_avsr import ADDED_ROWS_PREFIX, LIGHT_WEIGHTS_NAME

logger = logging.getLogger(__name__)

# (substring of a component name, licence). The combined weights are bound by every component's licence.
KNOWN_LICENCES = (
    ("smollm2", "Apache-2.0"),
    ("tinyllama", "Apache-2.0"),
    ("whisper", "MIT"),
    ("llama-3.2", "Llama 3.2 Community License"),
    ("llama-3.1", "Llama 3.1 Community License"),
    ("llama-3", "Llama 3 Community License"),
    ("llama-2", "Llama 2 Community License"),
    ("avhubert", "AV-HuBERT License (non-commercial research only; no biometric processing or surveillance)"),
    ("av_hubert", "AV-HuBERT License (non-commercial research only; no biometric processing or surveillance)"),
    ("vox_iter", "AV-HuBERT License (non-commercial research only; no biometric processing or surveillance)"),
)


# ---- light checkpoints -----------------------------------------------------------------------------------------


def _base_components(model, base_components=None) -> dict:
    components = {**(getattr(model.config, "base_components", None) or {}), **(base_components or {})}
    if not components.get("text_model"):
        raise ValueError(
            "A light checkpoint must name the base components it is composed from, and this model does not record "
            "them (it was not built with from_components, or before they were recorded). Pass "
            "base_components={'text_model': ..., 'audio_encoder': ..., 'video_encoder': ...} (Hub ids, folders or "
            "offline names)."
        )
    if model.config.uses_audio and not components.get("audio_encoder"):
        raise ValueError("A light checkpoint of an ASR/AVSR model needs base_components['audio_encoder'].")
    if "text_vocab_size" not in components:
        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(resolve_component(components["text_model"]))
        components["text_vocab_size"] = getattr(text_config, "text_config", text_config).vocab_size
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in components.items()}


def _encoder_is_saved(config, components, which: str) -> bool:
    """An encoder goes into the light file when it was trained or has no pretrained source to reload from."""
    frozen = config.freeze_audio_encoder if which == "audio" else config.freeze_video_encoder
    return not frozen or not components.get(f"{which}_encoder")


def light_state_dict(model, base_components: dict) -> dict:
    """The tensors a light checkpoint holds (see the module docstring), keyed like the model's state dict."""
    config, vocab = model.config, base_components["text_vocab_size"]
    saved = {}
    for name, tensor in model.state_dict().items():
        keep = "lora_" in name or "_projector." in name
        keep |= name.startswith("model.audio_encoder.") and _encoder_is_saved(config, base_components, "audio")
        keep |= name.startswith("model.video_encoder.") and _encoder_is_saved(config, base_components, "video")
        if keep:
            saved[name] = tensor
    rows = {"model.language_model.embed_tokens.weight": model.get_input_embeddings().weight}
    if not config.tie_word_embeddings:
        rows["lm_head.weight"] = model.get_output_embeddings().weight
    for name, weight in rows.items():
        if weight.shape[0] > vocab:
            saved[ADDED_ROWS_PREFIX + name] = weight[vocab:]
    return {name: tensor.detach().contiguous().cpu() for name, tensor in saved.items()}


def save_light_checkpoint(model, save_directory, base_components: dict | None = None):
    """Write a light checkpoint of `model` (config, generation config, code for trust_remote_code, light weights)."""
    from transformers.dynamic_module_utils import custom_object_save

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    components = _base_components(model, base_components)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.light_checkpoint = True
    config.base_components = components
    config.architectures = [model.__class__.__name__]
    if model._auto_class is not None:  # copies the modeling files (and this one) and writes auto_map
        custom_object_save(model, save_directory, config=config)
    config.save_pretrained(save_directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(save_directory)
    tensors = light_state_dict(model, components)
    save_file(tensors, save_directory / LIGHT_WEIGHTS_NAME, metadata={"format": "pt", "kind": "llama-avsr-light"})
    logger.info("light checkpoint: %d tensors, %.1f MB in %s", len(tensors),
                sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, save_directory)
    return save_directory


# ---- model card ------------------------------------------------------------------------------------------------


def _licence(name) -> str:
    lowered = str(name).lower().replace("_", "-").replace("smollm2-", "smollm2")
    for key, licence in KNOWN_LICENCES:
        if key.replace("_", "-") in lowered or key in str(name).lower():
            return licence
    return "unknown: check the component's own licence"


def _read_evaluation(evaluation):
    """`evaluation`: examples/run_avsr.py's summary.json (path or dict) or {condition: {"wer": ...}}."""
    if evaluation is None:
        return None
    if isinstance(evaluation, (str, Path)):
        evaluation = json.loads(Path(evaluation).read_text())
    return evaluation


def model_card(model, kind: str = "full", base_components: dict | None = None, evaluation=None,
               repo_id: str | None = None) -> str:
    """README.md text: YAML metadata, what the model is, the last evaluation's WER, intended use and licences."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    components = {**(getattr(config, "base_components", None) or {}), **(base_components or {})}
    text_name = components.get("text_model") or config.text_config.name_or_path or config.text_config.model_type
    audio_name = components.get("audio_encoder") or (config.audio_config.name_or_path if config.uses_audio else None)
    video_name = components.get("video_encoder") or ("AV-HuBERT (no pretrained source recorded)"
                                                     if config.uses_video else None)
    summary = _read_evaluation(evaluation) or {}
    results = summary.get("test", summary if all(isinstance(v, dict) for v in summary.values()) else {})
    lam = summary.get("decorrelation_weight")

    parts = [("LLM", text_name)]
    if config.uses_audio:
        parts.append(("audio encoder", audio_name))
    if config.uses_video:
        parts.append(("video encoder", video_name))
    licences = [(role, name, _licence(name)) for role, name in parts]
    permissive = all(licence in ("Apache-2.0", "MIT") for _, _, licence in licences)
    base_models = [str(name) for _, name, _ in licences if name and "/" in str(name) and not Path(str(name)).exists()]

    rates = []
    if config.uses_audio:
        rates.append(f"audio {config.audio_compression_rate} ({20 * config.audio_compression_rate} ms per token)")
    if config.uses_video:
        rates.append(f"video {config.video_compression_rate} ({40 * config.video_compression_rate} ms per token)")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    modality = config.modality.upper()

    lines = [
        f"# Llama-AVSR {modality}: {text_name}" + (f" + {audio_name}" if config.uses_audio else "")
        + (f" + {video_name}" if config.uses_video else ""),
        "",
        f"Speech recognition with an LLM ({modality}): frozen encoders, compressed and projected into the input "
        "embeddings of a LoRA-tuned causal LLM, which writes the transcript. Built with llama-avsr, a "
        "transformers-native implementation of Llama-AVSR (Cappellazzo et al.).",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| modality | {modality} (prompt: \"{config.prompt}\") |",
        f"| compression | {config.compression_type}, rates: {', '.join(rates)} |",
    ]
    if config.uses_audio:
        lines.append(f"| audio encoder | {audio_name} (d={config.audio_config.d_model}, "
                     f"{'frozen' if config.freeze_audio_encoder else 'trained'}) |")
    if config.uses_video:
        lines.append(f"| video encoder | {video_name} (d={config.video_config.hidden_size}, "
                     f"{config.video_config.num_hidden_layers} layers, "
                     f"{'frozen' if config.freeze_video_encoder else 'trained'}) |")
    lines += [
        f"| LLM | {text_name} ({config.text_config.num_hidden_layers} layers, hidden "
        f"{config.text_config.hidden_size}), LoRA rank {config.lora_rank}, alpha {config.lora_alpha} on "
        f"{', '.join(config.lora_target_modules)} |",
        f"| projectors | Linear-ReLU-Linear, hidden {config.projector_hidden_size}"
        f"{' + LayerNorm' if config.projector_layer_norm else ''} |",
        f"| decorrelation weight lambda | {lam:g} |" if lam is not None else
        "| decorrelation weight lambda | not recorded |",
        f"| parameters | {total / 1e6:.1f} M, of which {trainable / 1e6:.2f} M trained |",
        f"| checkpoint | {_kind_text(kind, components)} |",
        "",
        "## Evaluation",
        "",
    ]
    if results:
        lines += ["| test condition | WER % | utterances |", "| --- | --- | --- |"]
        count = summary.get("test_utterances", "")
        for condition, metrics in results.items():
            wer = metrics.get("wer", metrics.get("test_wer"))
            lines.append(f"| {condition} | {100 * wer:.2f} | {count} |" if wer is not None else
                         f"| {condition} | n/a | {count} |")
        if summary.get("saved_to") or summary.get("args"):
            lines += ["", "From the run summary written by `examples/run_avsr.py`."]
    else:
        lines.append("No evaluation was recorded with this checkpoint.")
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f"asr = pipeline(\"audio-visual-speech-recognition\", model=\"{repo_id or 'PATH_OR_REPO'}\", "
        "trust_remote_code=True)",
        "asr(\"clip.mp4\")  # {'text': ...}",
        "```",
        "",
        "With `pip install llama-avsr`, `llama-avsr transcribe clip.mp4 --model "
        f"{repo_id or 'PATH_OR_REPO'}` does the same from the shell.",
        "",
        "## Intended use and limitations",
        "",
        "Research on LLM-based audio-visual speech recognition: transcribing short English utterances (up to 30 s "
        "a piece; longer input is split at pauses) from 16 kHz audio and/or 25 fps 88x88 mouth-region video "
        "prepared as in auto_avsr. It is not evaluated for other languages, far-field or overlapping speech, "
        "and must not be used to identify people, for surveillance or for biometric processing. Transcripts can "
        "contain plausible-looking errors (an LLM writes them): do not use them where mistakes cause harm without a "
        "human check.",
        "",
        "## Licences of the components",
        "",
        "| component | source | licence |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {role} | {name} | {licence} |" for role, name, licence in licences]
    lines += ["", "The trained weights derive from every component above and are bound by all of their licences."]

    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        license="apache-2.0" if permissive else "other",
        tags=["llama-avsr", "audio-visual-speech-recognition", config.modality, f"{kind}-checkpoint"],
        base_model=base_models or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def _kind_text(kind, components):
    if kind == "light":
        names = ", ".join(f"{k}={v}" for k, v in components.items() if k != "text_vocab_size" and v)
        return f"light: projectors, LoRA and added-token rows; the base loads from {names}"
    return "full: every weight"


# ---- saving for the Hub and uploading --------------------------------------------------------------------------


def save_for_hub(model, processor, save_directory, kind: str = "full", base_components: dict | None = None,
                 evaluation=None, repo_id: str | None = None, pipeline_code: bool = True) -> Path:
    """Everything `push_to_hub` uploads: weights of `kind` ("full" or "light"), processor, README.md and, with
    `pipeline_code`, the pipeline module plus `custom_pipelines` in config.json so that
    `pipeline(task, model=repo, trust_remote_code=True)` works without this package (a folder with
    `custom_pipelines` needs trust_remote_code=True, or `pipeline_class=`, in transformers' pipeline())."""
    from transformers.dynamic_module_utils import custom_object_save

    from .pipeline_llama_avsr import TASK, AudioVisualSpeechRecognitionPipeline

    if kind not in ("full", "light"):
        raise ValueError(f"kind must be 'full' or 'light', got {kind!r}")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    if kind == "light":
        components = _base_components(model, base_components)
        save_light_checkpoint(model, save_directory, components)
    else:
        components = base_components
        model.save_pretrained(save_directory)
    processor.save_pretrained(save_directory)
    if pipeline_code:
        custom_object_save(AudioVisualSpeechRecognitionPipeline, save_directory)
        config_path = save_directory / "config.json"
        config = json.loads(config_path.read_text())
        config["custom_pipelines"] = {
            TASK: {
                "impl": f"{AudioVisualSpeechRecognitionPipeline.__module__.split('.')[-1]}."
                        f"{AudioVisualSpeechRecognitionPipeline.__name__}",
                "pt": ["AutoModelForCausalLM"],
                "type": "multimodal",
            }
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = model_card(model, kind=kind, base_components=components, evaluation=evaluation, repo_id=repo_id)
    (save_directory / "README.md").write_text(card)
    return save_directory


def push_to_hub(model, processor, repo_id: str, kind: str = "full", base_components: dict | None = None,
                evaluation=None, private: bool | None = None, token: str | None = None,
                commit_message: str | None = None, pipeline_code: bool = True):
    """Create `repo_id` if needed and upload the `save_for_hub` folder in one commit. Returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, processor, folder, kind=kind, base_components=base_components, evaluation=evaluation,
                     repo_id=repo_id, pipeline_code=pipeline_code)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload Llama-AVSR {model.config.modality.upper()} ({kind} checkpoint)",
        )


def checkpoint_size(folder) -> int:
    """Bytes of the weight files in a saved folder (both kinds)."""
    return sum(os.path.getsize(p) for p in Path(folder).glob("*.safetensors"))


__all__ = [
    "LIGHT_WEIGHTS_NAME",
    "checkpoint_size",
    "light_state_dict",
    "model_card",
    "push_to_hub",
    "save_for_hub",
    "save_light_checkpoint",
]
