"""Fast tests of modeling_llama_avsr.analysis on tiny random models (the real-weight checks are in
test_analysis_smollm2.py)."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
from modeling_llama_avsr.analysis import (
    SinkMonitorCallback,
    act_calibration,
    analyze,
    attention_scores,
    bos_cosine_similarity,
    calibrate,
    decoder_of,
    detect_sinks,
    layer_statistics,
    massive_activations,
    measure,
    mlp_origin,
    processor_token_types,
    record_attention_scores,
    rotate_hidden_state,
    search_act_heads,
    token_types,
)
from modeling_llama_avsr.analysis.tokens import AUDIO, AUDIO_MARKER, BOS, PAD, PROMPT, TRANSCRIPT, VIDEO, VIDEO_MARKER

from tiny import random_clips, tiny_config, tiny_processor, tiny_tokenizer

TARGETS = ["place blue at f two now", "red green by one", "place red in three now"]


@pytest.fixture(scope="module")
def avsr():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_config("avsr", tokenizer=tokenizer)
    processor = tiny_processor("avsr", config.audio_compression_rate, config.video_compression_rate, tokenizer)
    model = LlamaAVSRForConditionalGeneration(config).eval()
    clips = random_clips(3, seed=3, seconds=(0.5, 1.5))
    batch = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=TARGETS)
    # The encoders dominate the tiny model's time; most tests feed the decoder the merged embeddings directly.
    seen = {}
    hook = decoder_of(model).register_forward_pre_hook(lambda m, a, k: seen.update(k) and None, with_kwargs=True)
    with torch.no_grad():
        model(**_inputs(batch))
    hook.remove()
    fast = {"inputs_embeds": seen["inputs_embeds"], "attention_mask": batch["attention_mask"]}
    return model, processor, batch, fast


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# ---- eq. 5-7 against an independent per-sample computation -----------------------------------------------------------


def _random_maps(lengths, total, heads, layers, padding_side, seed=0):
    """Softmax maps with causal + padding masks, as a model would give, for samples of the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, total - n:] = 1 if padding_side == "left" else 0
        mask[b, :n] = 1 if padding_side == "right" else mask[b, :n]
    visible = torch.tril(torch.ones(total, total, dtype=torch.bool))[None] & mask.bool()[:, None, :]
    maps = []
    for _ in range(layers):
        logits = 3 * torch.randn(len(lengths), heads, total, total, generator=g)
        logits = logits.masked_fill(~visible[:, None], float("-inf"))
        maps.append(torch.nan_to_num(torch.softmax(logits, -1), nan=0.25))  # garbage in padded rows
    return tuple(maps), mask


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_attention_scores_eq5_with_padding(padding_side):
    lengths, total, heads = [7, 4, 5], 7, 3
    maps, mask = _random_maps(lengths, total, heads, 2, padding_side)
    scores = attention_scores(maps, mask)
    assert scores.shape == (3, 2, total)
    for b, n in enumerate(lengths):
        real = mask[b].bool()
        for layer in range(2):
            a = maps[layer][b][:, real][:, :, real]  # the sample alone, (H, n, n)
            for i in range(n):
                expected = a[:, i:, i].sum() / (heads * (n - i))  # eq. 5, 0-indexed
                assert math.isclose(scores[b, layer, real.nonzero()[i]].item(), expected.item(), rel_tol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_massive_activations_and_bos_cosine_with_padding(padding_side):
    torch.manual_seed(1)
    lengths, total, dim = [6, 3], 6, 8
    _, mask = _random_maps(lengths, total, 1, 1, padding_side)
    hidden = torch.randn(2, total, dim)
    hidden[0, 2, 5] = 5000.0
    hidden[1, mask[1].bool().nonzero()[0], 3] = -4000.0  # the second sample's BOS
    hidden[1, ~mask[1].bool()] = 1e6  # padding must not count
    flags = massive_activations(hidden, mask, tau=1000.0)
    states = (hidden, 2 * hidden + 1)
    cosine = bos_cosine_similarity(states, mask)
    for b in range(2):
        real = hidden[b][mask[b].bool()].numpy()
        median = np.median(np.abs(real).ravel())  # numpy's median (mean of the middle two), as a user might
        expected = np.abs(real) >= 1000.0 * median
        np.testing.assert_array_equal(flags[b][mask[b].bool()].numpy(), expected)
        assert not flags[b][~mask[b].bool()].any()
        for entry, state in enumerate(states):
            real = state[b][mask[b].bool()]
            expected = torch.nn.functional.cosine_similarity(real, real[:1], dim=-1)
            torch.testing.assert_close(cosine[b, entry][mask[b].bool()], expected)
    assert flags[0, 2, 5] and flags[1].sum() == 1


def test_detect_sinks_splits_bos_and_intermediate():
    scores = torch.full((1, 2, 6), 0.05)
    scores[0, :, 1] = 0.9  # BOS (left padding: position 1)
    scores[0, 1, 4] = 0.5
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    sinks = detect_sinks(scores, mask, threshold=2.0)  # 2 / 5 tokens = 0.4
    assert sinks.bos.tolist() == [[True, True]]
    assert sinks.positions(0, 0) == [] and sinks.positions(0, 1) == [4]


def test_layer_statistics():
    hidden = torch.ones(1, 4, 5)
    hidden[0, 0, 3] = -3000.0
    stats = layer_statistics((hidden, hidden), k=2)
    assert stats.top_tokens[0, 0, 0] == 0 and stats.top_features[0, 0, 0] == 3
    assert stats.ratio[0, 0] == pytest.approx(3000.0)
    assert stats.massive_tokens[0][1] == [0] and stats.massive_features[0][1] == [3]


# ---- token types -----------------------------------------------------------------------------------------------------


def test_token_types_follow_the_layout(avsr):
    _, processor, batch, _ = avsr
    types = processor_token_types(processor, batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    t = processor.token_ids
    for b in range(len(ids)):
        row = types[b][mask[b]].tolist()
        assert row[0] == BOS and (types[b][~mask[b]] == PAD).all()
        assert row[1] == AUDIO_MARKER and row.count(AUDIO_MARKER) == 2 and row.count(VIDEO_MARKER) == 2
        assert row.count(AUDIO) == (ids[b] == t["audio_token_id"]).sum()
        assert row.count(VIDEO) == (ids[b] == t["video_token_id"]).sum()
        assert row.count(PROMPT) == len(processor.tokenizer(processor.prompt, add_special_tokens=False)["input_ids"])
        assert (types[b] == TRANSCRIPT).sum() == (labels[b] != -100).sum()
    # Without labels the prompt length decides, with the same answer.
    again = token_types(ids, mask, token_ids=t, prompt_length=int((types[0] == PROMPT).sum()))
    torch.testing.assert_close(again, types)


# ---- hooked scores ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_chunk", [7, 128])
def test_hooked_scores_equal_eager_maps(avsr, query_chunk):
    model, _, _, inputs = avsr
    decoder = decoder_of(model)
    assert decoder.config._attn_implementation == "sdpa"
    with torch.no_grad():
        with record_attention_scores(model, query_chunk=query_chunk) as recorder:
            sdpa_logits = model(**inputs).logits
        hooked = recorder.scores()
        assert decoder.config._attn_implementation == "sdpa"  # restored
        torch.testing.assert_close(model(**inputs).logits, sdpa_logits, rtol=0, atol=0)  # outputs are sdpa's
        decoder.set_attn_implementation("eager")
        try:
            eager = model(**inputs, output_attentions=True)
        finally:
            decoder.set_attn_implementation("sdpa")
    full = attention_scores(eager.attentions, inputs["attention_mask"])
    valid = inputs["attention_mask"].bool()[:, None, :].expand_as(full)
    torch.testing.assert_close(hooked[valid], full[valid], rtol=0, atol=1e-5)


def test_measure_on_a_plain_causal_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    run = measure(model, {"input_ids": ids, "attention_mask": mask})
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    full = attention_scores(eager.attentions, mask)
    torch.testing.assert_close(run.scores[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(run.scores[1, :, 3:], full[1, :, 3:], atol=1e-5, rtol=0)
    assert len(run.hidden_states) == 3


# ---- interventions and origin ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("toward", ["bos", "nearest", "position"])
def test_rotation_sets_direction_and_keeps_norm(avsr, toward):
    model, _, _, inputs = avsr
    length = inputs["attention_mask"].shape[1]
    layer, token = 1, length - 4  # real in every sample (left padding)
    toward = length - 8 if toward == "position" else toward
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True).hidden_states[layer]
    seen = {}
    block = decoder_of(model).layers[layer]

    def capture(module, args, kwargs):  # registered after the rotation's hook, so it sees the rotated state
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    with rotate_hidden_state(model, layer, token, toward=toward, sinks=[3]) as rotation:
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
    rotated = seen["h"]
    bos = inputs["attention_mask"].long().argmax(-1)
    for b in range(len(rotated)):
        target = rotation.targets[b]
        if toward == "bos":
            assert target == bos[b]
        elif toward == "nearest":
            assert target not in (token, 3, int(bos[b]))
            cosine = torch.nn.functional.cosine_similarity(before[b], before[b, token][None], dim=-1)
            allowed = inputs["attention_mask"][b].bool().clone()
            allowed[[token, 3, int(bos[b])]] = False
            assert target == int(torch.where(allowed, cosine, -2.0).argmax())
        direction = torch.nn.functional.cosine_similarity(rotated[b, token], before[b, target], dim=0)
        assert direction == pytest.approx(1.0, abs=1e-5)
        assert rotated[b, token].norm() == pytest.approx(before[b, token].norm().item(), rel=1e-5)
        others = torch.ones(rotated.shape[1], dtype=torch.bool)
        others[token] = False
        torch.testing.assert_close(rotated[b, others], before[b, others])


def test_mlp_origin_decomposes_the_layer(avsr):
    model, _, _, inputs = avsr
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    layer, features = 1, [3, 17]
    origin = mlp_origin(model, inputs, layer, features, tokens=[int(inputs["attention_mask"][1].argmax())], sample=1,
                        top_units=64)
    real = inputs["attention_mask"][1].bool()
    total = origin.residual_in + origin.attention_out + origin.mlp_out
    torch.testing.assert_close(total, hidden[layer + 1][1][real][:, features], atol=1e-5, rtol=1e-5)
    # The down-projection of SiLU(gate) * up, unit by unit, adds up to the MLP output (all 64 units kept).
    torch.testing.assert_close(origin.unit_contributions.sum(-1), origin.mlp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(origin.act, torch.nn.functional.silu(origin.gate) * origin.up)
    assert origin.tokens == [0]
    assert set(origin.summary()["features"]) == {"3", "17"}


# ---- ACT ------------------------------------------------------------------------------------------------------------


def test_calibrate_rows_sum_to_one_and_scale_sinks():
    torch.manual_seed(0)
    n = 8
    logits = torch.randn(2, 3, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    logits[..., 4] += 4.0  # key 4 becomes a sink
    probs = torch.softmax(logits, -1)
    out = calibrate(probs, heads=[0, 2], beta=0.4, threshold=0.3, bos=torch.tensor([0, 0]))
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, n))
    torch.testing.assert_close(out[:, 1], probs[:, 1])  # head not chosen
    torch.testing.assert_close(out[:, [0, 2], :, 4], 0.4 * probs[:, [0, 2], :, 4])
    assert (out[:, [0, 2], 5:, 0] > probs[:, [0, 2], 5:, 0]).all()  # BOS is not calibrated; it gets a share
    torch.testing.assert_close(calibrate(probs, [0, 1, 2], 1.0, 0.1, torch.tensor([0, 0])), probs)
    # Redistribution is proportional: the ratio between two non-sink keys is unchanged.
    ratio = out[:, 0, 7, 1] / out[:, 0, 7, 2]
    torch.testing.assert_close(ratio, probs[:, 0, 7, 1] / probs[:, 0, 7, 2])


def test_act_in_the_model(avsr):
    model, _, _, inputs = avsr
    decoder = decoder_of(model)
    decoder.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True)
    finally:
        decoder.set_attn_implementation("sdpa")
    every_head = {(layer, head) for layer in range(3) for head in range(4)}
    with torch.no_grad():
        with act_calibration(model, every_head, beta=1.0, threshold=0.0):
            unchanged = model(**inputs).logits
        torch.testing.assert_close(unchanged, eager.logits, atol=1e-5, rtol=0)
        with act_calibration(model, {(1, 0), (2, 3)}, beta=0.2, threshold=0.05):
            calibrated = model(**inputs, output_attentions=True)
    assert decoder.config._attn_implementation == "sdpa"
    real = inputs["attention_mask"].bool()
    for layer, attn in enumerate(calibrated.attentions):
        rows = attn.sum(-1)[real[:, None, :].expand(-1, attn.shape[1], -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows))
    torch.testing.assert_close(calibrated.attentions[0], eager.attentions[0], atol=1e-5, rtol=0)
    assert not torch.allclose(calibrated.attentions[1][:, 0], eager.attentions[1][:, 0], atol=1e-4)
    torch.testing.assert_close(calibrated.attentions[1][:, 1:3], eager.attentions[1][:, 1:3], atol=1e-5, rtol=0)


def test_act_generate_calibrates_prefill_only(avsr):
    model, processor, batch, _ = avsr
    inputs = _inputs(batch)
    pad = processor.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        plain = model.generate(**inputs, **kwargs)
        with act_calibration(model, {(0, 0)}, beta=1.0):
            same = model.generate(**inputs, **kwargs)
        with act_calibration(model, {(l, h) for l in range(3) for h in range(4)}, beta=0.0, threshold=0.02):
            model.generate(**inputs, **kwargs)  # runs; decoding steps attend plainly
    assert same.tolist() == plain.tolist()


def test_head_search():
    good = {(2, 1), (3, 0)}

    def wer(heads):  # each good head lowers the WER, any other head raises it
        return 0.3 - 0.05 * len(heads & good) + 0.01 * len(heads - good)

    greedy = search_act_heads(wer, num_layers=5, num_heads=2)
    assert greedy.heads == good and greedy.wer == pytest.approx(0.2) and greedy.baseline_wer == pytest.approx(0.3)
    assert len(greedy.history) == 1 + 3 * 2
    individual = search_act_heads(wer, num_layers=5, num_heads=2, mode="individual")
    assert individual.heads == good and individual.wer == pytest.approx(0.2)


# ---- report, callback, command line ----------------------------------------------------------------------------------


def test_analyze_writes_report_and_figures(avsr, tmp_path):
    model, processor, batch, fast = avsr
    types = processor_token_types(processor, batch)
    report = analyze(model, fast, types=types, out_dir=tmp_path, threshold=2.0, tau=20.0)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["num_layers"] == 3 and len(saved["layers"]) == 3
    assert saved["token_types"][0] == "BOS" and "audio marker" in saved["token_types"]
    for path in report["figures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.md").read_text().startswith("# Attention sinks")


def test_sink_monitor_callback(avsr):
    model, _, batch, _ = avsr

    class State:
        global_step = 7

    class Trainer:
        logged = []

        def log(self, values):
            self.logged.append(values)

    trainer = Trainer()
    callback = SinkMonitorCallback(dict(batch), trainer=trainer)
    model.train()
    metrics = {"eval_loss": 1.0}
    callback.on_evaluate(None, State(), None, model=model, metrics=metrics)
    assert model.training  # restored
    model.eval()
    keys = {"eval_sinks/intermediate", "eval_sinks/max_activation_ratio", "eval_sinks/prefix_cos_bos"}
    assert keys <= set(metrics) and set(trainer.logged[0]) == keys
    assert -1.0 <= metrics["eval_sinks/prefix_cos_bos"] <= 1.0 and metrics["eval_sinks/max_activation_ratio"] >= 1.0
    assert callback.history[0]["step"] == 7


def test_analyze_command_on_a_causal_lm_folder(tmp_path, capsys):
    import argparse

    from modeling_llama_avsr.analysis import add_analyze_arguments, run_analyze

    from tiny import WORDS

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    parser = argparse.ArgumentParser()
    add_analyze_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "lm"), "--text", " ".join(WORDS[:12]), "--out",
                              str(tmp_path / "out"), "--no-interventions"])
    assert run_analyze(args) == 0
    assert "BOS sink" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["num_tokens"] == 13 and report["tokens"][0] == "<s>"
