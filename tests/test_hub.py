"""Full and light checkpoints, the model card and the Hub upload (everything up to the upload call, offline)."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel

from modeling_llama_avsr import AVHubertConfig, LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.hub import ADAPTER_WEIGHTS_NAME, checkpoint_size, model_card, push_to_hub, save_for_hub

from remote_code import remote_logits_match
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


def compose(parts, modality):
    video = AVHubertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           conv_pos=8, conv_pos_groups=2, resnet_frontend_channels=4, resnet_channels=[4, 4, 8, 8],
                           audio_feat_dim=8)
    components = dict(parts, modality=modality, video_encoder=video if modality != "asr" else None)
    if modality == "vsr":
        components.pop("audio_encoder")
    settings = dict(projector_hidden_size=24, lora_rank=4, lora_alpha=8, freeze_video_encoder=False)
    model = LlamaAVSRForConditionalGeneration.from_components(**components, **settings).eval()
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


@pytest.mark.slow
def test_smollm2_light_checkpoint_is_small_and_exact(tmp_path, offline_cache_dir):
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
    for kind in ("full", "light"):
        loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path / kind).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
