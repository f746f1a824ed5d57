"""Fast tests of the AV-HuBERT lip encoder on tiny random configs (CPU, a few seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig

from modeling_llama_avsr.configuration_avhubert import AVHubertConfig
from modeling_llama_avsr.modeling_avhubert import AVHubertModel


def tiny_config(**kwargs) -> AVHubertConfig:
    sizes = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_pos=8,
        conv_pos_groups=4,
        resnet_frontend_channels=8,
        resnet_layers=[1, 1, 1, 1],
        resnet_channels=[8, 16, 16, 24],
    )
    return AVHubertConfig(**{**sizes, **kwargs})


def randomize_batchnorm_stats(model: torch.nn.Module) -> None:
    # Fresh BatchNorms are the identity in eval mode; random statistics make the front-end non-trivial.
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def tiny_model() -> AVHubertModel:
    torch.manual_seed(0)
    model = AVHubertModel(tiny_config()).eval()
    randomize_batchnorm_stats(model)
    return model


def test_output_shapes_and_hidden_states(tiny_model):
    video = torch.randn(2, 1, 6, 88, 88)
    with torch.no_grad():
        out = tiny_model(video, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 6, 32)
    assert len(out.hidden_states) == tiny_model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 6, 32) for h in out.hidden_states)
    # The last entry is the final, LayerNorm-ed output.
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
    as_tuple = tiny_model(video, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


def test_padding_invariance(tiny_model):
    torch.manual_seed(1)
    lengths = [7, 4]
    video = torch.randn(2, 1, 7, 88, 88)
    # Garbage (not zeros) in the padded frames: the model must ignore it.
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batched = tiny_model(video, attention_mask=mask.long()).last_hidden_state
        for index, length in enumerate(lengths):
            alone = tiny_model(video[index : index + 1, :, :length]).last_hidden_state
            torch.testing.assert_close(batched[index : index + 1, :length], alone, atol=1e-5, rtol=1e-5)
    assert torch.all(batched[1, 4:] == 0)


def test_eval_determinism_and_train_mode(tiny_model):
    video = torch.randn(1, 1, 5, 88, 88)
    with torch.no_grad():
        first = tiny_model(video).last_hidden_state
        second = tiny_model(video).last_hidden_state
    assert torch.equal(first, second)

    # Training mode: dropout and layerdrop are live; gradients reach the front-end.
    model = AVHubertModel(tiny_config(layerdrop=0.5))
    model.train()
    model(torch.randn(1, 1, 3, 32, 32)).last_hidden_state.sum().backward()  # any frame size works
    assert model.feature_extractor_video.resnet.frontend3D[0].weight.grad is not None


def test_transformer_matches_functional_reference(tiny_model):
    """Re-derive the forward from the fairseq code with torch's own multi-head attention (time-first layout)."""
    torch.manual_seed(2)
    config = tiny_model.config
    video = torch.randn(2, 1, 5, 88, 88)
    model = tiny_model
    with torch.no_grad():
        expected = model(video).last_hidden_state

        video_feats = model.feature_extractor_video.proj(model.feature_extractor_video.resnet(video))
        feats = torch.cat([torch.zeros_like(video_feats), video_feats], dim=-1)  # audio stream first
        feats = F.layer_norm(feats, (2 * config.hidden_size,), model.layer_norm.weight, model.layer_norm.bias)
        x = model.post_extract_proj(feats)

        conv = model.encoder.pos_conv[0]
        g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
        weight = g * v / v.norm(dim=(0, 1), keepdim=True)
        pos = F.conv1d(
            x.transpose(1, 2), weight, conv.bias, padding=config.conv_pos // 2, groups=config.conv_pos_groups
        )
        x = x + F.gelu(pos[..., :-1]).transpose(1, 2)

        x = x.transpose(0, 1)  # T x B x C, as fairseq
        for layer in model.encoder.layers:
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            h, _ = F.multi_head_attention_forward(
                h, h, h, config.hidden_size, config.num_attention_heads,
                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=False,
            )  # fmt: skip
            x = x + h
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        reference = model.encoder.layer_norm(x).transpose(0, 1)
    torch.testing.assert_close(expected, reference, atol=1e-5, rtol=1e-5)


def test_fairseq_parameter_names(tiny_model):
    names = set(tiny_model.state_dict())
    expected = {
        "feature_extractor_video.resnet.frontend3D.0.weight",
        "feature_extractor_video.resnet.frontend3D.1.running_mean",
        "feature_extractor_video.resnet.frontend3D.2.weight",
        "feature_extractor_video.resnet.trunk.layer1.0.conv1.weight",
        "feature_extractor_video.resnet.trunk.layer1.0.relu1.weight",
        "feature_extractor_video.resnet.trunk.layer2.0.downsample.0.weight",
        "feature_extractor_video.resnet.trunk.layer4.0.bn2.weight",
        "feature_extractor_video.proj.weight",
        "feature_extractor_audio.proj.weight",
        "post_extract_proj.weight",
        "layer_norm.weight",
        "encoder.pos_conv.0.bias",
        "encoder.pos_conv.0.parametrizations.weight.original0",
        "encoder.pos_conv.0.parametrizations.weight.original1",
        "encoder.layers.0.self_attn.k_proj.weight",
        "encoder.layers.0.self_attn.q_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.self_attn_layer_norm.weight",
        "encoder.layers.0.fc1.weight",
        "encoder.layers.1.final_layer_norm.bias",
        "encoder.layer_norm.weight",
    }
    assert expected <= names
    assert not any(k.startswith(("mask_emb", "label_embs_concat", "final_proj")) for k in names)
    # Stage 1 keeps the stem's width in the real ResNet-18: no downsample there.
    assert "feature_extractor_video.resnet.trunk.layer1.0.downsample.0.weight" not in names


def test_load_fairseq_named_state_dict(tmp_path, tiny_model):
    """A fairseq-style state dict (weight_g/weight_v, pretraining keys) loads with from_pretrained as is."""
    state = {k: v.clone().contiguous() for k, v in tiny_model.state_dict().items()}
    prefix = "encoder.pos_conv.0."
    state[prefix + "weight_g"] = state.pop(prefix + "parametrizations.weight.original0")
    state[prefix + "weight_v"] = state.pop(prefix + "parametrizations.weight.original1")
    state["mask_emb"] = torch.zeros(104)
    state["label_embs_concat"] = torch.zeros(10, 32)
    state["final_proj.weight"] = torch.zeros(8, 32)
    state["final_proj.bias"] = torch.zeros(8)
    tiny_model.config.save_pretrained(tmp_path)
    save_file(state, tmp_path / "model.safetensors")

    loaded = AVHubertModel.from_pretrained(tmp_path).eval()
    video = torch.randn(1, 1, 4, 88, 88)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video).last_hidden_state, tiny_model(video).last_hidden_state)


def test_save_load_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    loaded = AVHubertModel.from_pretrained(tmp_path).eval()
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in ignore} == {
        k: v for k, v in tiny_model.config.to_dict().items() if k not in ignore
    }
    video = torch.randn(1, 1, 3, 88, 88)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video).last_hidden_state, tiny_model(video).last_hidden_state)


def test_config_round_trip_and_auto(tmp_path):
    config = tiny_config(layer_norm_eps=1e-6)
    config.save_pretrained(tmp_path)
    reloaded = AVHubertConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.resnet_channels == [8, 16, 16, 24]
    try:
        AutoConfig.register("avhubert", AVHubertConfig)
    except ValueError:
        pass  # already registered by the package
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AVHubertConfig)
    # fairseq field names are aliases.
    assert AVHubertConfig(encoder_embed_dim=64, encoder_attention_heads=4, conv_pos_groups=4).hidden_size == 64
    with pytest.raises(Exception):
        AVHubertConfig(hidden_size=30)


def test_default_large_and_base_configs():
    large = AVHubertConfig()
    assert (large.hidden_size, large.num_hidden_layers, large.intermediate_size, large.num_attention_heads) == (
        1024, 24, 4096, 16,
    )  # fmt: skip
    assert (large.conv_pos, large.conv_pos_groups, large.layer_norm_first) == (128, 16, True)
    assert (large.modality_fusion, large.audio_feat_dim, large.video_feat_dim) == ("concat", 104, 512)
    assert large.resnet_layers == [2, 2, 2, 2] and large.resnet_relu_type == "prelu"
    base = AVHubertConfig.base()
    assert (base.hidden_size, base.num_hidden_layers, base.intermediate_size, base.num_attention_heads) == (
        768, 12, 3072, 12,
    )  # fmt: skip
    assert base.conv_pos == 128 and base.layer_norm_first


def test_large_parameter_count():
    with torch.device("meta"):
        model = AVHubertModel(AVHubertConfig())

    def count(module):
        return sum(p.numel() for p in module.parameters())

    d, ffn, layers, k, groups = 1024, 4096, 24, 128, 16
    per_layer = 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    pos_conv = d * (d // groups) * k + k + d  # weight_v, weight_g (1, 1, k), bias
    transformer = layers * per_layer + pos_conv + 2 * d
    assert count(model.encoder) == transformer == 310_701_184

    # ResNet-18 trunk without its 7x7 stem (BasicBlocks, PReLU per block), plus the Conv3d stem.
    def stage(c_in, c, blocks):
        convs = 9 * c_in * c + 9 * c * c + (blocks - 1) * 2 * 9 * c * c + (c_in * c if c_in != c else 0)
        norms = (2 * blocks + (c_in != c)) * 2 * c
        return convs + norms + 2 * blocks * c

    stem = 64 * 5 * 7 * 7 + 2 * 64 + 64
    resnet = stem + stage(64, 64, 2) + stage(64, 128, 2) + stage(128, 256, 2) + stage(256, 512, 2)
    assert count(model.feature_extractor_video.resnet) == resnet
    assert 11.0e6 < resnet < 11.3e6  # ResNet-18 is 11.7M with its 2D stem and classifier

    fusion = (512 * d + d) + (104 * d + d) + 2 * 2 * d + (2 * d * d + d)
    total = count(model)
    assert total == transformer + resnet + fusion
    # AV-HuBERT Large is reported as 325M parameters (Shi et al., 2022).
    assert math.isclose(total, 325e6, rel_tol=0.005)


def test_frame_classification_loss_ignores_padding_and_base_model_round_trips(tmp_path):
    from modeling_llama_avsr.modeling_avhubert import AVHubertForFrameClassification

    torch.manual_seed(3)
    model = AVHubertForFrameClassification(tiny_config(num_labels=5)).eval()
    video = torch.randn(2, 1, 7, 88, 88)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    labels = torch.randint(0, 5, (2, 7)).masked_fill(mask == 0, -100)
    out = model(video, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 7, 5)
    # Independent: per-sample logits from the unpadded clips, mean CE over the 11 real frames.
    logits = [model(video[i : i + 1, :, : int(n)]).logits[0] for i, n in enumerate(mask.sum(1))]
    targets = torch.cat([labels[0], labels[1, :4]])
    expected = F.cross_entropy(torch.cat(logits), targets)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # Under Trainer (gradient accumulation, several processes) the sum is divided by the global count instead.
    summed = model(video, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(22)).loss
    torch.testing.assert_close(summed, expected * 11 / 22, rtol=1e-5, atol=1e-6)

    # The encoder alone saves as a plain AVHubertModel (what LlamaAVSR loads as its video encoder).
    model.avhubert.save_pretrained(tmp_path)
    encoder = AVHubertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(video, attention_mask=mask).last_hidden_state,
                                   model.avhubert(video, attention_mask=mask).last_hidden_state)

    # A few steps on one batch fit it: the head and the encoder both learn.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = model(video, attention_mask=mask, labels=labels).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
