"""Full and light checkpoints, the model card and the Hub upload (everything up to the upload call, offline)."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel

from modeling_llama_avsr import AVHubertConfig, LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.hub import ADAPTER_WEIGHTS_NAME, checkpoint_size, model_card, push_to_hub, save_for_hub

from remote_code import HIDE_PACKAGE, remote_logits_match
from tiny import random_clips, tiny_config, tiny_tokenizer

SUMMARY = {"modality": "asr", "decorrelation_weight": 100.0, "test_utterances": 200,
           "test": {"clean": {"wer": 0.0512}, "babble 0 dB": {"wer": 0.2391}}}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Tiny pretrained components saved as folders, as `from_components` reads them."""
    root = tmp_path_factory.mktemp("components")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text = tiny_config("asr", tokenizer=tiny_tokenizer()).text_config
    text.vocab_size = len(tokenizer)
    LlamaForCausalLM(text).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    whisper = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                            vocab_size=60, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(whisper).save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return {"text_model": str(root / "llm"), "audio_encoder": str(root / "whisper")}


def compose_base(parts, modality):
    """The untrained composition (what a light checkpoint's base is), and the components it was made from."""
    video = AVHubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           conv_pos=8, conv_pos_groups=2, resnet_frontend_channels=4, resnet_channels=[4, 4, 8, 8],
                           audio_feat_dim=8)
    components = dict(parts, modality=modality, video_encoder=video if modality != "asr" else None)
    if modality == "vsr":
        components.pop("audio_encoder")
    settings = dict(projector_hidden_size=24, lora_rank=4, lora_alpha=8, freeze_video_encoder=False)
    return LlamaAVSRForConditionalGeneration.from_components(**components, **settings).eval(), components


def compose(parts, modality):
    model, components = compose_base(parts, modality)
    # Stand-in for training: everything trainable moves away from its initialisation.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    components.pop("video_encoder")
    processor = LlamaAVSRProcessor.from_components(**components, prompt="transcribe speech to text .")
    return model, processor


def inputs_for(processor, modality):
    audio, video = random_clips(1, seed=3)[0]
    return processor(audio=[audio] if modality != "vsr" else None, videos=[video] if modality != "asr" else None)


@pytest.mark.parametrize("modality", ["asr", "avsr"])
def test_full_and_light_reload_to_identical_logits(parts, tmp_path, modality):
    model, processor = compose(parts, modality)
    inputs = inputs_for(processor, modality)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_for_hub(model, processor, tmp_path / "full", kind="full", evaluation=SUMMARY)
    save_for_hub(model, processor, tmp_path / "light", kind="light", evaluation=SUMMARY)

    light_config = json.loads((tmp_path / "light" / "config.json").read_text())
    assert light_config["light_checkpoint"] is True
    assert light_config["base_components"]["text_model"] == parts["text_model"]
    assert (tmp_path / "light" / ADAPTER_WEIGHTS_NAME).is_file() and not (tmp_path / "light" / "model.safetensors").exists()
    assert json.loads((tmp_path / "light" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert checkpoint_size(tmp_path / "light") < checkpoint_size(tmp_path / "full")

    for kind in ("full", "light"):
        loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path / kind).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
            n for n, p in model.named_parameters() if p.requires_grad
        }
        assert loaded.generation_config.suppress_tokens == model.generation_config.suppress_tokens
        result = remote_logits_match(tmp_path / kind, inputs, expected, extra_check="""
            import numpy as np
            from transformers import pipeline
            pipe = pipeline("audio-visual-speech-recognition", model=FOLDER, trust_remote_code=True,
                            max_new_tokens=2)
            clip = {"audio": np.zeros(16000, np.float32), "video": np.zeros((25, 96, 96), np.uint8)}
            assert isinstance(pipe(clip)["text"], str), pipe(clip)
        """.replace("FOLDER", repr(str(tmp_path / kind))))
        assert "REMOTE_OK" in result.stdout, (kind, result.stderr[-3000:])


def test_light_keeps_trained_encoder_and_added_rows(parts, tmp_path):
    from safetensors.torch import load_file

    model, processor = compose(parts, "avsr")
    save_for_hub(model, processor, tmp_path, kind="light", pipeline_code=False)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS_NAME)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    # The video encoder was trained (freeze_video_encoder=False) and has no pretrained source: it is saved whole.
    assert adapter["modules_to_save"] == ["model.audio_projector", "model.video_projector", "model.video_encoder"]
    assert any(k.startswith("base_model.model.model.video_encoder.") for k in tensors)
    assert not any(k.startswith(("base_model.model.model.audio_encoder.",
                                 "base_model.model.model.language_model.layers.0.mlp")) for k in tensors)
    assert any("lora_A" in k for k in tensors) and any("_projector." in k for k in tensors)
    rows = tensors["base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta"]
    added = list(range(model.config.base_components["text_vocab_size"], len(processor.tokenizer)))
    assert adapter["trainable_token_indices"] == {"model.language_model.embed_tokens": added}
    torch.testing.assert_close(rows, model.get_input_embeddings().weight[added].detach(), rtol=0, atol=0)
    assert "custom_pipelines" not in json.loads((tmp_path / "config.json").read_text())


def test_light_checkpoint_base_components_can_be_overridden(parts, tmp_path):
    import shutil

    model, processor = compose(parts, "asr")
    save_for_hub(model, processor, tmp_path / "light", kind="light")
    moved = tmp_path / "moved_llm"
    shutil.copytree(parts["text_model"], moved)
    inputs = inputs_for(processor, "asr")
    loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path / "light",
                                                               base_components={"text_model": str(moved)})
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert loaded.config.base_components["text_model"] == str(moved)


def test_light_needs_named_components(parts, tmp_path):
    model = LlamaAVSRForConditionalGeneration(tiny_config("asr"))
    with pytest.raises(ValueError, match="base_components"):
        save_for_hub(model, None, tmp_path, kind="light")


def test_model_card_contents(parts):
    model, _ = compose(parts, "avsr")
    card = model_card(model, kind="light", evaluation=SUMMARY, repo_id="me/llama-avsr-tiny")
    for text in ("modality | AVSR", "compression | avg, rates: audio 4 (80 ms per token), video 2 (80 ms per token)",
                 "decorrelation weight lambda | 100", "| clean | 5.12 | 200 |", "| babble 0 dB | 23.91 | 200 |",
                 "## Intended use and limitations", "## Licences of the components", "LoRA rank 4, alpha 8",
                 "me/llama-avsr-tiny", "light (peft adapter)"):
        assert text in card, text
    assert "No evaluation was recorded" in model_card(model)


def test_licences_of_known_components():
    from modeling_llama_avsr.hub import _licence

    assert _licence("smollm2-135m") == "Apache-2.0"
    assert _licence("openai/whisper-medium.en") == "MIT"
    assert _licence("meta-llama/Llama-3.2-3B").startswith("Llama 3.2")
    assert "non-commercial" in _licence("large_vox_iter5.pt")


def test_push_to_hub_uploads_the_prepared_folder(parts, monkeypatch):
    from huggingface_hub import HfApi

    model, processor = compose(parts, "asr")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        from pathlib import Path

        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["readme"] = (Path(folder_path) / "README.md").read_text()
        calls["config"] = json.loads((Path(folder_path) / "config.json").read_text())
        calls["message"] = commit_message
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert push_to_hub(model, processor, "me/tiny", kind="light", evaluation=SUMMARY, private=True) == "commit"
    assert calls["create"] == ("me/tiny", {"private": True, "exist_ok": True})
    assert {ADAPTER_WEIGHTS_NAME, "adapter_config.json", "README.md", "config.json", "processor_config.json", "pipeline_llama_avsr.py",
            "modeling_llama_avsr.py", "tokenization_llama_avsr.py", "configuration_llama_avsr.py",
            "generation_config.json", "tokenizer.json"} <= set(calls["files"])
    assert "hub.py" not in calls["files"]  # the model no longer reaches up into the Hub code
    assert calls["config"]["custom_pipelines"]["audio-visual-speech-recognition"]["impl"] == (
        "pipeline_llama_avsr.AudioVisualSpeechRecognitionPipeline")
    assert "| clean | 5.12 |" in calls["readme"] and "light checkpoint" in calls["message"]


def test_peft_and_transformers_load_the_light_folder(parts, tmp_path):
    # The light folder is a peft adapter: peft's PeftModel and transformers' load_adapter put it onto a freshly
    # composed base (other random projectors, video encoder and added-token rows) and give the trained model's logits.
    from peft import PeftModel

    model, processor = compose(parts, "avsr")
    inputs = inputs_for(processor, "avsr")
    with torch.no_grad():
        expected = model(**inputs).logits
    save_for_hub(model, processor, tmp_path, kind="light", pipeline_code=False)
    base, _ = compose_base(parts, "avsr")
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits, expected)
        peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
        torch.testing.assert_close(peft_model(**inputs).logits, expected, rtol=0, atol=0)
    base, _ = compose_base(parts, "avsr")
    base.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(**inputs).logits, expected, rtol=0, atol=0)


def test_untied_output_embeddings_keep_their_added_rows(tmp_path):
    # An LLM whose lm_head is not tied to its embeddings (Llama 3 8B, ...): the added rows of both are stored.
    from peft import PeftModel

    from modeling_llama_avsr.hub import save_light_checkpoint
    from modeling_llama_avsr.modeling_llama_avsr import load_light_weights

    config = tiny_config("asr")
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False

    def base():
        torch.manual_seed(0)
        return LlamaAVSRForConditionalGeneration(config).eval()

    trained = base()
    assert trained.lm_head.weight is not trained.get_input_embeddings().weight
    added = sorted(getattr(config, name) for name in ("audio_start_token_id", "audio_end_token_id",
                                                      "video_start_token_id", "video_end_token_id", "audio_token_id",
                                                      "video_token_id"))
    with torch.no_grad():
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
        trained.get_input_embeddings().weight[added] += 1.0
        trained.lm_head.weight[added] -= 1.0
    save_light_checkpoint(trained, tmp_path, require_base=False)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] == {"model.language_model.embed_tokens": added, "lm_head": added}

    inputs = inputs_for(tiny_processor_for(config), "asr")
    with torch.no_grad():
        expected = trained(**inputs).logits
        torch.testing.assert_close(load_light_weights(base(), tmp_path)(**inputs).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(PeftModel.from_pretrained(base(), tmp_path).eval()(**inputs).logits, expected,
                                   rtol=0, atol=0)
    # without base components it resumes training, but cannot be composed on its own
    with pytest.raises(ValueError, match="names no base components"):
        LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path)


def tiny_processor_for(config):
    from tiny import tiny_processor

    return tiny_processor(config.modality, config.audio_compression_rate, config.video_compression_rate)


def edited_copy(source, target, edit_config=None, edit_file=None):
    shutil.copytree(source, target)
    if edit_config is not None:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    if edit_file is not None:
        edit_file(target)
    return target


def truncate(name):
    def edit(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return edit


@pytest.mark.parametrize("edit,error,message", [
    (lambda c: c["text_config"].update(num_hidden_layers=2), ValueError,
     r"tensors not in the model \(model\.language_model\.layers\.2\."),
    (lambda c: c["text_config"].update(num_hidden_layers=4), ValueError,
     r"tensors missing from the checkpoint \(model\.language_model\.layers\.3\."),
    (lambda c: c.update(projector_hidden_size=20), ValueError,
     r"of another shape \(model\.audio_projector\.linear_1\.bias: checkpoint \(24,\), model \(20,\)"),
])
def test_full_checkpoint_that_does_not_fit_its_config_is_refused(parts, tmp_path, edit, error, message):
    model, _ = compose(parts, "asr")
    model.save_pretrained(tmp_path / "full")
    folder = edited_copy(tmp_path / "full", tmp_path / "edited", edit_config=edit)
    with pytest.raises(error, match=re.escape(str(folder)) + ": the weights do not fit .*" + message):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("kind,name", [("full", "model.safetensors"), ("light", ADAPTER_WEIGHTS_NAME)])
def test_unreadable_weight_file_is_named(parts, tmp_path, kind, name):
    model, processor = compose(parts, "asr")
    save_for_hub(model, processor, tmp_path / kind, kind=kind, pipeline_code=False)
    folder = edited_copy(tmp_path / kind, tmp_path / "truncated", edit_file=truncate(name))
    with pytest.raises(OSError, match=re.escape(str(folder / name)) + ": cannot read this weight file"):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)


def test_light_checkpoint_that_does_not_fit_its_config_is_refused(parts, tmp_path):
    model, processor = compose(parts, "asr")
    save_for_hub(model, processor, tmp_path / "light", kind="light", pipeline_code=False)
    # config.json and the adapter disagree on the rank
    folder = edited_copy(tmp_path / "light", tmp_path / "rank", edit_config=lambda c: c.update(lora_rank=2))
    with pytest.raises(ValueError, match=re.escape(str(folder)) + ": adapter_config.json has LoRA r=4, lora_alpha=8 "
                       "but config.json has lora_rank=2, lora_alpha=8"):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)

    # both say rank 2, the tensors have rank 4
    def rank_two(folder):
        adapter = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**adapter, "r": 2}))

    folder = edited_copy(tmp_path / "light", tmp_path / "both", edit_config=lambda c: c.update(lora_rank=2),
                         edit_file=rank_two)
    with pytest.raises(ValueError, match=r"of another shape \(model\.language_model\.layers\.0\.self_attn\.q_proj"
                                         r"\.lora_A\.weight: checkpoint \(4, 32\), model \(2, 32\)"):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)

    folder = edited_copy(tmp_path / "light", tmp_path / "projector",
                         edit_config=lambda c: c.update(projector_hidden_size=20))
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": the weights do not fit .*model\.audio_projector"):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)

    def drop_a_tensor(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
        tensors.pop("base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight")
        save_file(tensors, folder / ADAPTER_WEIGHTS_NAME)

    folder = edited_copy(tmp_path / "light", tmp_path / "dropped", edit_file=drop_a_tensor)
    with pytest.raises(ValueError, match=r"1 tensors missing from the checkpoint \(model\.language_model\.layers\.1"
                                         r"\.self_attn\.v_proj\.lora_B\.weight\)"):
        LlamaAVSRForConditionalGeneration.from_pretrained(folder)


def front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---")[1])


def test_model_card_metadata_and_data_provenance(parts):
    summary = {**SUMMARY, "train_utterances": 1200, "args": {"data": {"dataset": "synthetic"}}}
    model, _ = compose(parts, "asr")
    model.config.base_components = {**model.config.base_components, "text_model": "smollm2-135m",
                                    "audio_encoder": "whisper-tiny.en"}
    card = model_card(model, kind="light", evaluation=summary, repo_id="me/llama-avsr-tiny")
    meta = front_matter(card)
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "openai/whisper-tiny.en"]
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"] and meta["metrics"] == ["wer"]
    assert meta["datasets"] == ["llama-avsr-synthetic-espeak"]
    assert {"llama-avsr", "audio-visual-speech-recognition", "peft"} <= set(meta["tags"])
    assert "pipeline_tag" not in meta  # no Hub task loads this model; the pipeline is the custom one
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["config"], r["metrics"][0]["type"], r["metrics"][0]["value"]) for r in results] == [
        ("clean", "wer", 5.12), ("babble 0 dB", "wer", 23.91)]
    for text in ("espeak-ng voices", "synthetic speech, not recordings of people", "trained on 1200 utterances",
                 "dequantised to float32 from the Q4_1 GGUF", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 "differ slightly", "The full checkpoint of the same run is the exact model", "@inproceedings",
                 "Large Language Models are Strong Audio-Visual Speech Recognition Learners",
                 "Mitigating Attention Sinks and Massive Activations", "pip install torch \"transformers>=5.23"):
        assert text in card, text


@pytest.mark.parametrize("modality,kind", [("asr", "full"), ("avsr", "light")])
def test_model_card_example_runs_without_the_package(parts, tmp_path, modality, kind):
    import soundfile as sf

    from make_trees import write_face_mp4

    model, processor = compose(parts, modality)
    folder = save_for_hub(model, processor, tmp_path / "model", kind=kind, evaluation=SUMMARY)
    example = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    example = example.replace("PATH_OR_REPO", str(folder))
    work = tmp_path / "user"
    work.mkdir()
    sf.write(work / "clip.wav", (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32), 16000)
    frames = np.random.default_rng(1).integers(0, 256, (25, 96, 96), dtype=np.uint8)
    write_face_mp4(work / "mouth.mp4", np.repeat(frames[..., None], 3, axis=-1), None)
    script = HIDE_PACKAGE + textwrap.dedent(example)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=work, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("import av" in example) == (modality != "asr")


@pytest.mark.slow
def test_smollm2_light_checkpoint_is_small_exact_and_portable(tmp_path, offline_cache_dir):
    components = dict(text_model="smollm2-135m", audio_encoder="whisper-tiny.en", modality="asr")
    model = LlamaAVSRForConditionalGeneration.from_components(**components).eval()
    processor = LlamaAVSRProcessor.from_components(**components)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    inputs = processor(audio=[audio])
    with torch.no_grad():
        expected = model(**inputs).logits
    save_for_hub(model, processor, tmp_path / "full", kind="full")
    save_for_hub(model, processor, tmp_path / "light", kind="light")
    ratio = checkpoint_size(tmp_path / "light") / checkpoint_size(tmp_path / "full")
    assert ratio < 0.05, ratio
    # The base is recorded as the public checkpoints; the offline copies it was trained on are preferred here.
    config = json.loads((tmp_path / "light" / "config.json").read_text())
    assert config["base_components"]["text_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["base_components"]["audio_encoder"] == "openai/whisper-tiny.en"
    assert config["offline_components"] == {"text_model": "smollm2-135m", "audio_encoder": "whisper-tiny.en"}
    for kind in ("full", "light"):
        loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path / kind).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    # Where llama-avsr is not installed, the light folder composes its base from the Hub ids (no Hub here: offline
    # mode makes that fail at once, naming the id it asked for).
    script = HIDE_PACKAGE + textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "light")!r}, trust_remote_code=True)
        except OSError as e:
            print("FAILED ON", e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert "FAILED ON" in result.stdout and "HuggingFaceTB/SmolLM2-135M-Instruct" in result.stdout, (
        result.stdout[-2000:], result.stderr[-3000:])
