"""Converters of foreign checkpoints, on tiny state dicts written here in the original layouts.

- AV-HuBERT fairseq pickles (argparse / omegaconf-like config objects) through the restricted unpickler; the
  converted encoder is compared with a functional re-derivation working on the raw fairseq tensors.
- Original Llama-AVSR checkpoints (projectors, reduction-factor LoRA, appended token rows); the converted model's
  logits are compared with a plain transformers Llama whose q/v weights have the LoRA merged by hand, fed with
  embeddings laid out as the original code builds them.
"""

import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_llama_avsr import AVHubertConfig, AVHubertModel
from modeling_llama_avsr.convert import (
    UnsafeCheckpointError,
    convert_avhubert_fairseq,
    convert_reference_checkpoint,
    load_fairseq_checkpoint,
)

from tiny import tiny_tokenizer


class DictConfig:
    """Stands for omegaconf's DictConfig: pickled by reference, with its content in `_content` nodes."""

    def __init__(self, content):
        self.__dict__["_content"] = {k: ValueNode(v) for k, v in content.items()}
        self.__dict__["_metadata"] = {"object_type": dict}


class ValueNode:
    def __init__(self, value):
        self._val = value


def avhubert_config():
    return AVHubertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_pos=8,
        conv_pos_groups=4, resnet_frontend_channels=4, resnet_layers=[1, 1, 1, 1], resnet_channels=[4, 8, 8, 8],
        audio_feat_dim=8,
    )


def fairseq_state(config, seed=0):
    """A fairseq-named AV-HuBERT state dict with random weights and BatchNorm statistics, plus pretraining keys."""
    torch.manual_seed(seed)
    state = {}
    for name, tensor in AVHubertModel(config).state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor
        elif name.endswith("running_var"):
            state[name] = torch.rand_like(tensor) + 0.5
        else:
            state[name] = torch.randn_like(tensor) * 0.3
    prefix = "encoder.pos_conv.0."
    state[prefix + "weight_g"] = state.pop(prefix + "parametrizations.weight.original0").abs()
    state[prefix + "weight_v"] = state.pop(prefix + "parametrizations.weight.original1")
    state["mask_emb"] = torch.randn(config.audio_feat_dim)
    state["label_embs_concat"] = torch.randn(7, config.hidden_size)
    state["final_proj.weight"] = torch.randn(3, config.hidden_size)
    state["final_proj.bias"] = torch.randn(3)
    return state


def reference_avhubert(sd, video, config):
    """AV-HuBERT video-only forward written from the fairseq code, on the raw fairseq tensors (eval mode)."""

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            eps=1e-5)

    def prelu(x, p):
        return F.prelu(x, sd[p + ".weight"])

    r = "feature_extractor_video.resnet."
    x = F.conv3d(video, sd[r + "frontend3D.0.weight"], stride=(1, 2, 2), padding=(2, 3, 3))
    x = F.max_pool3d(prelu(bn(x, r + "frontend3D.1"), r + "frontend3D.2"), (1, 3, 3), (1, 2, 2), (0, 1, 1))
    b, c, t = x.shape[:3]
    x = x.transpose(1, 2).reshape(b * t, c, *x.shape[3:])
    for stage in range(1, 5):
        p = f"{r}trunk.layer{stage}.0."
        stride = 1 if stage == 1 else 2
        shortcut = x
        if p + "downsample.0.weight" in sd:
            shortcut = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
        h = prelu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=stride, padding=1), p + "bn1"), p + "relu1")
        h = bn(F.conv2d(h, sd[p + "conv2.weight"], padding=1), p + "bn2")
        x = prelu(h + shortcut, p + "relu2")
    x = x.mean((2, 3)).view(b, t, -1)
    video_feats = F.linear(x, sd["feature_extractor_video.proj.weight"], sd["feature_extractor_video.proj.bias"])
    d = config.hidden_size
    x = torch.cat([torch.zeros_like(video_feats), video_feats], -1)
    x = F.layer_norm(x, (2 * d,), sd["layer_norm.weight"], sd["layer_norm.bias"])
    x = F.linear(x, sd["post_extract_proj.weight"], sd["post_extract_proj.bias"])
    g, v = sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)
    pos = F.conv1d(x.transpose(1, 2), weight, sd["encoder.pos_conv.0.bias"], padding=config.conv_pos // 2,
                   groups=config.conv_pos_groups)
    x = x + F.gelu(pos[..., :-1]).transpose(1, 2)
    heads = config.num_attention_heads
    for i in range(config.num_hidden_layers):
        p = f"encoder.layers.{i}."

        def lin(h, name):
            return F.linear(h, sd[p + name + ".weight"], sd[p + name + ".bias"])

        h = F.layer_norm(x, (d,), sd[p + "self_attn_layer_norm.weight"], sd[p + "self_attn_layer_norm.bias"])
        q, k, vv = (lin(h, f"self_attn.{n}_proj").view(b, t, heads, -1).transpose(1, 2) for n in "qkv")
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1) @ vv
        x = x + lin(attn.transpose(1, 2).reshape(b, t, d), "self_attn.out_proj")
        h = F.layer_norm(x, (d,), sd[p + "final_layer_norm.weight"], sd[p + "final_layer_norm.bias"])
        x = x + lin(F.gelu(lin(h, "fc1")), "fc2")
    return F.layer_norm(x, (d,), sd["encoder.layer_norm.weight"], sd["encoder.layer_norm.bias"])


# ---- AV-HuBERT fairseq ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_kind", ["namespace", "dictconfig", "finetuned"])
def test_avhubert_fairseq_matches_functional_reference(tmp_path, config_kind):
    config = avhubert_config()
    sd = fairseq_state(config)
    options = dict(encoder_attention_heads=2, dropout=0.0, attention_dropout=0.0, layer_norm_first=True,
                   encoder_layerdrop=0.0, activation_fn="gelu")
    if config_kind == "namespace":  # older fairseq: flat argparse options
        checkpoint = {"args": argparse.Namespace(**options), "cfg": None, "model": sd}
    elif config_kind == "dictconfig":  # hydra era: cfg.model is an omegaconf container
        checkpoint = {"args": None, "cfg": DictConfig({"model": DictConfig(options)}), "model": sd,
                      "extra_state": {"best": np.float64(1.5)}}
    else:  # AVHubertSeq2Seq: the encoder under encoder.w2v_model., its options under w2v_args
        checkpoint = {"cfg": {"model": {"w2v_args": {"model": options}}},
                      "model": {**{"encoder.w2v_model." + k: v for k, v in sd.items()},
                                "decoder.embed_tokens.weight": torch.randn(5, 16)}}
    path = tmp_path / "avhubert.pt"
    torch.save(checkpoint, path)

    model = convert_avhubert_fairseq(path, tmp_path / "hf")
    assert model.config.num_attention_heads == 2 and model.config.resnet_channels == [4, 8, 8, 8]
    assert model.config.layerdrop == 0.0 and model.config.hidden_dropout == 0.0
    video = torch.randn(2, 1, 5, 88, 88)
    with torch.no_grad():
        expected = reference_avhubert(sd, video, config)
        torch.testing.assert_close(model(video).last_hidden_state, expected, atol=1e-4, rtol=1e-4)
        reloaded = AVHubertModel.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(reloaded(video).last_hidden_state, expected, atol=1e-4, rtol=1e-4)


def test_fairseq_config_objects_are_read_not_run(tmp_path):
    sd = fairseq_state(avhubert_config())
    path = tmp_path / "ckpt.pt"
    torch.save({"cfg": DictConfig({"model": DictConfig({"encoder_attention_heads": 2, "conv_pos": 8})}),
                "model": sd}, path)
    checkpoint = load_fairseq_checkpoint(path)
    assert checkpoint["cfg"] == {"model": {"encoder_attention_heads": 2, "conv_pos": 8}}
    assert checkpoint["model"].keys() == sd.keys()


class _System:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').system('touch PWNED')",)


@pytest.mark.parametrize("payload", [_System(), _Eval()], ids=["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path, payload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": payload}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_fairseq_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_not_a_fairseq_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a fairseq checkpoint"):
        load_fairseq_checkpoint(tmp_path / "x.pt")


# ---- original Llama-AVSR checkpoints --------------------------------------------------------------------------


PROMPT = "transcribe speech to text ."
ORIGINAL_ADDED = ["<pad>", "<audio>", "</audio>", "<video>", "</video>"]


@pytest.fixture
def components(tmp_path):
    """Base LLM config + tokenizer and a Whisper config + feature extractor, saved as the converter reads them."""
    tokenizer = tiny_tokenizer()
    base_vocab = len(tokenizer)
    text_config = LlamaConfig(
        vocab_size=base_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    text_dir, audio_dir = tmp_path / "llm", tmp_path / "whisper"
    text_config.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    whisper = WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                            num_mel_bins=80)
    whisper.save_pretrained(audio_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(audio_dir)
    return text_dir, audio_dir, text_config, whisper, base_vocab


def original_state(text_config, whisper, base_vocab, reduction, rate, video_config=None, seed=0, layer_norm=False):
    """An `AVSR_LLMs` state dict as the original saves it (ASR, or AVSR with `video_config`; `layer_norm`: the
    projectors end with the LayerNorm of `--layernorm-projector`, module index 3 of their nn.Sequential)."""
    torch.manual_seed(seed)
    llm_config = LlamaConfig(**{**text_config.to_dict(), "vocab_size": base_vocab + len(ORIGINAL_ADDED)})
    llm = LlamaForCausalLM(llm_config)
    state = {"llm." + k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    hidden = text_config.hidden_size
    kv = text_config.num_key_value_heads * hidden // text_config.num_attention_heads
    inner = round(hidden / reduction)
    for i in range(text_config.num_hidden_layers):
        p = f"llm.model.layers.{i}.self_attn."
        state[p + "lora_down_Q.weight"] = torch.randn(inner, hidden) * 0.2
        state[p + "lora_up_Q.weight"] = torch.randn(hidden, inner) * 0.2
        state[p + "lora_down_V.weight"] = torch.randn(inner, hidden) * 0.2
        state[p + "lora_up_V.weight"] = torch.randn(kv, inner) * 0.2
    state.update({"audio_encoder." + k: torch.randn_like(v) * 0.2 for k, v in WhisperEncoder(whisper).state_dict().items()})
    for stream, dim in (("audio", whisper.d_model), ("video", video_config.hidden_size if video_config else None)):
        if dim is None:
            continue
        state[f"{stream}_proj.0.weight"] = torch.randn(24, dim * rate) * 0.2
        state[f"{stream}_proj.0.bias"] = torch.randn(24) * 0.1
        state[f"{stream}_proj.2.weight"] = torch.randn(hidden, 24) * 0.2
        state[f"{stream}_proj.2.bias"] = torch.randn(hidden) * 0.1
        if layer_norm:
            state[f"{stream}_proj.3.weight"] = 1 + torch.randn(hidden) * 0.1
            state[f"{stream}_proj.3.bias"] = torch.randn(hidden) * 0.1
    if video_config is not None:
        state.update({"video_encoder." + k: v for k, v in fairseq_state(video_config, seed).items()})
    return state


def original_logits(state, text_config, whisper, base_vocab, tokenizer, audio, scaling, rate, video_features=None):
    """The original's computation: [BOS] <audio> proj(stack(whisper)) </audio> [<video> ... </video>] prompt, through
    a plain Llama with LoRA merged into q/v (W + scaling * up @ down); the Whisper encoder runs on the 30-s window,
    its output cut at len / 16000 * 50 frames, and stacking drops a partial last window."""
    llm_config = LlamaConfig(**{**text_config.to_dict(), "vocab_size": base_vocab + len(ORIGINAL_ADDED)})
    llm = LlamaForCausalLM(llm_config).eval()
    merged = {k[len("llm."):]: v.clone() for k, v in state.items() if k.startswith("llm.") and "lora_" not in k}
    for i in range(text_config.num_hidden_layers):
        p = f"llm.model.layers.{i}.self_attn."
        for proj, letter in (("q_proj", "Q"), ("v_proj", "V")):
            delta = state[p + f"lora_up_{letter}.weight"] @ state[p + f"lora_down_{letter}.weight"]
            merged[f"model.layers.{i}.self_attn.{proj}.weight"] += scaling * delta
    llm.load_state_dict(merged, strict=False)
    llm.tie_weights()

    encoder = WhisperEncoder(whisper).eval()
    encoder.load_state_dict({k[len("audio_encoder."):]: v for k, v in state.items() if k.startswith("audio_encoder.")})
    mel = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="pt").input_features
    frames = encoder(mel).last_hidden_state[:, : len(audio) // 320]
    stacked = frames[:, : frames.shape[1] // rate * rate].reshape(1, -1, whisper.d_model * rate)

    def proj(x, stream):
        h = F.relu(F.linear(x, state[f"{stream}_proj.0.weight"], state[f"{stream}_proj.0.bias"]))
        h = F.linear(h, state[f"{stream}_proj.2.weight"], state[f"{stream}_proj.2.bias"])
        if f"{stream}_proj.3.weight" in state:
            h = F.layer_norm(h, h.shape[-1:], state[f"{stream}_proj.3.weight"], state[f"{stream}_proj.3.bias"])
        return h

    embed = llm.get_input_embeddings()
    ids = {t: base_vocab + i for i, t in enumerate(ORIGINAL_ADDED)}
    prompt = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    parts = [embed(torch.tensor([[tokenizer.bos_token_id, ids["<audio>"]]])), proj(stacked, "audio"),
             embed(torch.tensor([[ids["</audio>"]]]))]
    if video_features is not None:
        parts += [embed(torch.tensor([[ids["<video>"]]])), proj(video_features, "video"),
                  embed(torch.tensor([[ids["</video>"]]]))]
    parts.append(embed(prompt))
    return llm(inputs_embeds=torch.cat(parts, 1)).logits[0]


@pytest.mark.parametrize("reduction,scaling", [(8, 0.5), (8, 0.3)], ids=["integral-alpha", "folded-scaling"])
def test_reference_asr_checkpoint_matches_original_computation(tmp_path, components, reduction, scaling):
    text_dir, audio_dir, text_config, whisper, base_vocab = components
    rate = 2
    state = original_state(text_config, whisper, base_vocab, reduction, rate)
    path = tmp_path / "model_avg_4.pth"
    torch.save({"state_dict": {"model." + k: v for k, v in state.items()},
                "hyper_parameters": {"args": argparse.Namespace(reduction_lora=reduction)}}, path)

    model, processor = convert_reference_checkpoint(path, text_model=str(text_dir), audio_encoder=str(audio_dir),
                                                    lora_scaling=scaling, prompt=PROMPT)
    assert model.config.lora_rank == round(32 / reduction) and model.config.audio_compression_rate == rate
    assert model.config.compression_type == "stack" and model.config.modality == "asr"
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)  # 50 frames, 25 tokens
    inputs = processor(audio=[audio])
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        theirs = original_logits(state, text_config, whisper, base_vocab, processor.tokenizer, audio, scaling, rate)
    # Token rows differ in layout (our vocabulary is ordered differently): compare over the base vocabulary.
    torch.testing.assert_close(ours[:, :base_vocab], theirs[:, :base_vocab], atol=1e-4, rtol=1e-4)
    marker = processor.tokenizer.convert_tokens_to_ids("<audio>")
    torch.testing.assert_close(model.get_input_embeddings().weight[marker], state["llm.model.embed_tokens.weight"][
        base_vocab + 1])


def test_reference_avsr_checkpoint(tmp_path, components):
    text_dir, audio_dir, text_config, whisper, base_vocab = components
    video_config = avhubert_config()
    state = original_state(text_config, whisper, base_vocab, 8, 2, video_config=video_config)
    model, processor = convert_reference_checkpoint(state, text_model=str(text_dir), audio_encoder=str(audio_dir),
                                                    lora_scaling=0.5, prompt=PROMPT, video_config=video_config)
    assert model.config.modality == "avsr" and model.config.video_compression_rate == 2
    audio = (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(np.float32)
    video = np.random.default_rng(1).integers(0, 256, (24, 96, 96), dtype=np.uint8)
    inputs = processor(audio=[audio], videos=[video])
    video_sd = {k[len("video_encoder."):]: v for k, v in state.items() if k.startswith("video_encoder.")}
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        lips = reference_avhubert(video_sd, inputs["pixel_values_videos"].unsqueeze(1), video_config)
        theirs = original_logits(state, text_config, whisper, base_vocab, processor.tokenizer, audio, 0.5, 2,
                                 video_features=lips.reshape(1, -1, 2 * video_config.hidden_size))
    torch.testing.assert_close(ours[:, :base_vocab], theirs[:, :base_vocab], atol=1e-4, rtol=1e-4)


def test_reference_checkpoint_needs_the_lora_scaling(components):
    text_dir, audio_dir, text_config, whisper, base_vocab = components
    state = original_state(text_config, whisper, base_vocab, 8, 2)
    with pytest.raises(ValueError, match="lora_scaling"):
        convert_reference_checkpoint(state, text_model=str(text_dir), audio_encoder=str(audio_dir), prompt=PROMPT)


def test_reference_layer_norm_checkpoint_with_a_partial_last_window(tmp_path, components):
    # The sink paper's setting: projectors with LayerNorm. 0.94 s of audio gives 47 Whisper frames: stacking by 2
    # leaves a partial last window, which the original drops.
    text_dir, audio_dir, text_config, whisper, base_vocab = components
    state = original_state(text_config, whisper, base_vocab, 8, 2, layer_norm=True)
    model, processor = convert_reference_checkpoint(state, text_model=str(text_dir), audio_encoder=str(audio_dir),
                                                    lora_scaling=0.5, prompt=PROMPT, output_dir=tmp_path / "out")
    assert model.config.projector_layer_norm and model.config.partial_window == "drop"
    torch.testing.assert_close(model.model.audio_projector.layer_norm.weight, state["audio_proj.3.weight"])
    audio = (0.1 * np.random.default_rng(2).standard_normal(15040)).astype(np.float32)
    inputs = processor(audio=[audio])
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) == 47 // 2
    with torch.no_grad():
        ours = model(**inputs).logits[0]
        theirs = original_logits(state, text_config, whisper, base_vocab, processor.tokenizer, audio, 0.5, 2)
    torch.testing.assert_close(ours[:, :base_vocab], theirs[:, :base_vocab], atol=1e-4, rtol=1e-4)
    # The saved processor tokenises as the original did and keeps its token counts.
    from modeling_llama_avsr import LlamaAVSRProcessor

    saved = LlamaAVSRProcessor.from_pretrained(tmp_path / "out")
    assert saved.transcript_leading_space is False and saved.partial_window == "drop"


def save_base_llm(state, text_config, base_vocab, folder):
    """The pretrained LLM a run started from: the checkpoint's frozen LLM tensors, without the added rows."""
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(text_config)
    base.load_state_dict({k[len("llm."):]: v[:base_vocab] if "embed_tokens" in k else v
                          for k, v in state.items() if k.startswith("llm.") and "lora_" not in k}, strict=False)
    base.save_pretrained(folder)
    return str(folder)


def epoch_checkpoints(state, folder, n):
    """n Lightning checkpoints of one run: the frozen tensors of `state` in every epoch, the trained ones (LoRA,
    projectors) moved; the tied embedding is one tensor under two names, as the module's state_dict gives it."""
    paths, epochs = [], []
    for k in range(n):
        epoch = {key: value + 0.05 * (k + 1) * torch.randn_like(value) if ("lora_" in key or "_proj." in key)
                 else value.clone() for key, value in state.items()}
        epoch["llm.lm_head.weight"] = epoch["llm.model.embed_tokens.weight"]
        paths.append(folder / f"epoch={k}.ckpt")
        torch.save({"state_dict": {"model." + key: value for key, value in epoch.items()}}, paths[-1])
        epochs.append(epoch)
    return paths, epochs


def average_as_the_original_script(paths):
    """The arithmetic of the original's utils/avg_checkpoints_original.py: the first checkpoint's tensors receive the
    others' in place, key by key, and are then divided in place, key by key."""
    total = None
    for path in paths:
        state = {k[len("model."):]: v for k, v in torch.load(path)["state_dict"].items()}
        if total is None:
            total = state
            continue
        for key in total:
            total[key] += state[key]
    for key in total:
        total[key] /= len(paths)
    return total


def test_averaged_tied_checkpoint_rows_are_restored_from_the_base(tmp_path, components, caplog):
    from transformers import LlamaForCausalLM

    text_dir, audio_dir, text_config, whisper, base_vocab = components
    state = original_state(text_config, whisper, base_vocab, 8, 2)
    base_dir = save_base_llm(state, text_config, base_vocab, tmp_path / "base")

    n = 4
    paths, epochs = epoch_checkpoints(state, tmp_path, n)
    averaged = average_as_the_original_script(paths)
    embedding = state["llm.model.embed_tokens.weight"]
    # The arithmetic: the shared tensor is added and divided twice, (2N - 1) / N^2 of its value.
    torch.testing.assert_close(averaged["llm.model.embed_tokens.weight"], embedding * (2 * n - 1) / n**2)
    torch.save(averaged, tmp_path / f"model_avg_{n}.pth")
    correct = {key: torch.stack([epoch[key] for epoch in epochs]).mean(0) for key in epochs[0]}

    parts = dict(text_model=str(text_dir), audio_encoder=str(audio_dir), lora_scaling=0.5, prompt=PROMPT)
    with caplog.at_level("WARNING"):
        model, processor = convert_reference_checkpoint(tmp_path / f"model_avg_{n}.pth", base_model=base_dir,
                                                        **parts)
    assert "N = 4.00" in caplog.text and "Restored from the base" in caplog.text
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[:base_vocab], embedding[:base_vocab], rtol=0, atol=0)
    marker = processor.tokenizer.convert_tokens_to_ids("<audio>")
    torch.testing.assert_close(weight[marker], embedding[base_vocab + 1])  # the added rows: divided by the factor
    audio = (0.1 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32)
    with torch.no_grad():
        ours = model(**processor(audio=[audio])).logits[0]
        theirs = original_logits(correct, text_config, whisper, base_vocab, processor.tokenizer, audio, 0.5, 2)
    torch.testing.assert_close(ours[:, :base_vocab], theirs[:, :base_vocab], atol=1e-4, rtol=1e-4)

    caplog.clear()
    with caplog.at_level("WARNING"):  # without the base the rows cannot be checked: the user is told how
        convert_reference_checkpoint(tmp_path / f"model_avg_{n}.pth", **parts)
    assert "Pass base_model=" in caplog.text

    other = LlamaForCausalLM(text_config)  # another LLM's rows are not a multiple of the checkpoint's: refused
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="not the LLM it was trained from"):
        convert_reference_checkpoint(tmp_path / f"model_avg_{n}.pth", base_model=str(tmp_path / "other"), **parts)


def test_lightning_checkpoint_equal_to_its_base_converts_quietly(tmp_path, components, caplog):
    text_dir, audio_dir, text_config, whisper, base_vocab = components
    state = original_state(text_config, whisper, base_vocab, 8, 2)
    paths, _ = epoch_checkpoints(state, tmp_path, 1)
    base_dir = save_base_llm(state, text_config, base_vocab, tmp_path / "base")
    with caplog.at_level("WARNING"):
        model, _ = convert_reference_checkpoint(paths[0], text_model=str(text_dir), audio_encoder=str(audio_dir),
                                                lora_scaling=0.5, prompt=PROMPT, base_model=base_dir)
    assert "base_model" not in caplog.text and "Restored" not in caplog.text
    torch.testing.assert_close(model.get_input_embeddings().weight[:base_vocab],
                               state["llm.model.embed_tokens.weight"][:base_vocab])
