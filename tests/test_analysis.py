"""Fast tests of modeling_llama_avsr.analysis on tiny random models (the real-weight checks are in
test_analysis_smollm2.py)."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llama_avsr.analysis import (
    SinkMonitorCallback,
    analyze,
    attention_scores,
    bos_cosine_similarity,
    decoder_of,
    detect_sinks,
    layer_statistics,
    massive_activations,
    measure,
    mlp_origin,
    nearest_non_sink,
    processor_token_types,
    record_attention_scores,
    relative_attention_scores,
    rotate_hidden_state,
    token_types,
)
from modeling_llama_avsr.analysis.plots import plot_intervention
from modeling_llama_avsr.analysis.tokens import AUDIO, AUDIO_MARKER, BOS, PAD, PROMPT, TRANSCRIPT, VIDEO, VIDEO_MARKER

from analysis_models import tiny_avsr
from tiny import tiny_tokenizer


def eager_forward(model, inputs, **kwargs):
    """The independent reference: one forward under eager attention, which returns its probabilities."""
    decoder = decoder_of(model)
    decoder.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, **kwargs)
    finally:
        decoder.set_attn_implementation("sdpa")

@pytest.fixture(scope="module")
def avsr():
    return tiny_avsr()


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
    relative = torch.full((1, 2, 12), 1.0)
    relative[0, :, 1] = 9.0  # BOS (left padding: position 1)
    relative[0, 1, 4] = 6.0
    relative[0, 0, 7] = 5.5  # 11 - 7 - 4 + 1 = 1 query four or more positions later: too few to judge
    mask = torch.tensor([[0] + [1] * 11])
    sinks = detect_sinks(relative, mask, threshold=5.0, min_queries=2, window=4)
    assert sinks.bos.tolist() == [[True, True]]
    assert sinks.positions(0, 0) == [] and sinks.positions(0, 1) == [4]
    summary = sinks.summary()
    json.dumps(summary)
    assert summary["samples"][0]["bos_sink_layers"] == [0, 1]
    assert summary["samples"][0]["intermediate_sinks"] == [{"position": 3, "layers": [1]}]  # sample coordinates
    assert summary["intermediate_per_layer"] == [0, 1]


def _relative_by_hand(maps, mask, window):
    """The relative score sample by sample, query by query: mean over attended queries q >= i + window of
    (mean over heads of A[q, i]) * (q' + 1), q' the query's position in its sample."""
    expected = torch.zeros(mask.shape[0], len(maps), mask.shape[1])
    for b in range(mask.shape[0]):
        real = mask[b].bool().nonzero().flatten()
        for layer, attn in enumerate(maps):
            a = attn[b].mean(0)[real][:, real]  # (n, n) the sample alone
            for i in range(len(real)):
                queries = range(i + window, len(real))
                if queries:
                    expected[b, layer, real[i]] = sum(float(a[q, i]) * (q + 1) for q in queries) / len(queries)
    return expected


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_relative_scores_with_padding(padding_side):
    lengths, total = [9, 6, 7], 9
    maps, mask = _random_maps(lengths, total, heads=3, layers=2, padding_side=padding_side, seed=4)
    relative = relative_attention_scores(maps, mask, window=2)
    expected = _relative_by_hand(maps, mask, window=2)
    real = mask.bool()[:, None, :].expand_as(relative)
    torch.testing.assert_close(relative[real], expected[real], rtol=1e-5, atol=1e-6)
    # Uniform causal attention scores exactly 1 wherever a query is far enough, whatever the position.
    uniform = torch.tril(torch.ones(total, total))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None].expand(1, 2, total, total)
    ones = relative_attention_scores((uniform,), window=3)[0, 0]
    torch.testing.assert_close(ones[: total - 3], torch.ones(total - 3))


def _sinky_maps(length, heads, layers, sinks=(), local=0.0, seed=0, temperature=3.0):
    """Causal softmax maps with random logits (scaled by `temperature`), every later query giving each key in
    `sinks` (position -> share) that share of its attention, and `local` of it to itself (the strong
    self/neighbour attention of a model's last tokens)."""
    g = torch.Generator().manual_seed(seed)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    maps = []
    for _ in range(layers):
        logits = temperature * torch.randn(1, heads, length, length, generator=g)
        attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        planted = torch.zeros(length, length)
        for key, share in dict(sinks).items():
            planted[key + 1:, key] = share
        planted += local * torch.eye(length)
        rest = (1 - planted.sum(-1, keepdim=True)).clamp(min=0)
        maps.append(attn * rest + planted)
    return tuple(maps)


def _old_rule(scores, length, threshold=5.0):
    """The rule this replaces: eq. 5 score > threshold / N."""
    return scores > threshold / length


def test_random_attention_has_no_sink_and_a_planted_one_is_found():
    length = 48
    maps = _sinky_maps(length, heads=4, layers=3, seed=0)
    assert _old_rule(attention_scores(maps), length).any()  # the last keys: few queries see them
    assert not detect_sinks(relative_attention_scores(maps)).mask.any()
    planted = _sinky_maps(length, heads=4, layers=3, sinks={0: 0.3, 17: 0.25}, seed=0)
    sinks = detect_sinks(relative_attention_scores(planted))
    assert sinks.bos.all()
    assert all(sinks.positions(0, layer) == [17] for layer in range(3))


def test_strong_local_attention_at_the_end_is_not_a_sink():
    # What the main job's model looked like under the old rule: a BOS sink, and transcript tokens that attend to
    # themselves and their neighbours. Only the BOS is a sink.
    length = 60
    maps = _sinky_maps(length, heads=4, layers=2, sinks={0: 0.4}, local=0.5, seed=1)
    flagged_before = _old_rule(attention_scores(maps), length)[0, :, 1:].any(0).nonzero().flatten() + 1
    assert (flagged_before >= length - 10).all() and len(flagged_before) >= 5
    sinks = detect_sinks(relative_attention_scores(maps))
    assert sinks.bos.all() and not sinks.intermediate.any()


def test_random_model_has_no_sink_and_a_planted_one_is_found():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    ids[:, 13] = 2  # the token planted below
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    run = measure(model, inputs)
    assert not run.sinks().mask.any()
    # Plant a sink: token 2 gets a key that every query matches, along the slowest rotary pair (RoPE barely turns
    # it over 40 positions), through a feature no other token has.
    head_dim = config.hidden_size // config.num_attention_heads
    slow = head_dim // 2 - 1
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, :2] = 0.0
        embeddings[:, 0] = 0.3  # every token's query carries feature 0
        embeddings[2, 1] = 3.0  # only token 2 carries feature 1
        for block in model.model.layers:
            block.self_attn.q_proj.weight[slow::head_dim, 0] = 4.0
            block.self_attn.k_proj.weight[slow::head_dim, 1] = 4.0
    planted = measure(model, inputs).sinks()
    assert planted.intermediate[:, :, 13].all()  # in every layer of both samples
    assert set(planted.intermediate.nonzero()[:, 2].tolist()) == {13}


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
    relative = relative_attention_scores(eager.attentions, inputs["attention_mask"])
    torch.testing.assert_close(recorder.relative_scores()[valid], relative[valid], rtol=1e-5, atol=1e-5)


def test_visible_keys_reads_every_mask_form():
    # What an attention function may receive: None (causal), sdpa's 4D bool, eager's 4D additive float, flash's 2D
    # padding mask; all describe the same keys.
    from transformers.masking_utils import eager_mask, sdpa_mask

    from modeling_llama_avsr.analysis.hooks import visible_keys

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None] & padding[:, None, :]
    common = dict(batch_size=2, q_length=5, kv_length=5, attention_mask=padding)
    torch.testing.assert_close(visible_keys(sdpa_mask(**common, allow_is_causal_skip=False), 5, 5, "cpu"), expected)
    torch.testing.assert_close(visible_keys(eager_mask(**common), 5, 5, "cpu"), expected)
    torch.testing.assert_close(visible_keys(padding, 5, 5, "cpu"), expected)
    torch.testing.assert_close(visible_keys(None, 3, 5, "cpu")[0], torch.tril(torch.ones(3, 5, dtype=torch.bool), 2))
    with pytest.raises(TypeError, match="BlockMask"):
        visible_keys(object(), 5, 5, "cpu")


def test_measure_sees_act(avsr):
    # Under ACT, the measured scores are eq. 5 of the calibrated maps an eager forward returns under the same ACT,
    # and the hidden states are those of the calibrated forward.
    from modeling_llama_avsr.analysis import act_calibration

    model, _, _, inputs = avsr
    mask = inputs["attention_mask"]
    plain = measure(model, inputs)
    with act_calibration(model, {(1, 0), (1, 2), (2, 3)}, beta=0.2, threshold=0.05):
        run = measure(model, inputs)
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True, output_hidden_states=True)
    valid = mask.bool()[:, None, :].expand_as(run.scores)
    torch.testing.assert_close(run.scores[valid], attention_scores(eager.attentions, mask)[valid], rtol=0, atol=1e-6)
    torch.testing.assert_close(run.relative_scores[valid],
                               relative_attention_scores(eager.attentions, mask)[valid], rtol=1e-5, atol=1e-5)
    for measured, calibrated in zip(run.hidden_states, eager.hidden_states):
        torch.testing.assert_close(measured, calibrated, rtol=0, atol=0)
    assert (plain.scores - run.scores)[valid].abs().max() > 1e-2  # the calibration does change the scores


def test_measure_keeps_the_attention_implementation_set(avsr):
    model, _, _, inputs = avsr
    decoder = decoder_of(model)
    decoder.set_attn_implementation("eager")
    try:
        run = measure(model, inputs)
        assert decoder.config._attn_implementation == "eager"
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        decoder.set_attn_implementation("sdpa")
    for measured, expected in zip(run.hidden_states, eager.hidden_states):
        torch.testing.assert_close(measured, expected, rtol=0, atol=0)  # eager's own forward, to the last bit
    valid = inputs["attention_mask"].bool()[:, None, :].expand_as(run.scores)
    torch.testing.assert_close(run.scores[valid], attention_scores(eager.attentions, inputs["attention_mask"])[valid],
                               rtol=0, atol=1e-6)


def test_measure_exposes_the_last_layer_before_the_final_norm(avsr):
    model, _, _, inputs = avsr
    decoder = decoder_of(model)
    seen = {}
    handle = decoder.layers[-1].register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        run = measure(model, inputs)
    finally:
        handle.remove()
    torch.testing.assert_close(run.last_layer_output, seen["out"], rtol=0, atol=0)
    torch.testing.assert_close(decoder.norm(run.last_layer_output), run.hidden_states[-1])
    raw = run.raw_hidden_states
    assert len(raw) == len(run.hidden_states) and raw[-1] is run.last_layer_output
    assert all(a is b for a, b in zip(raw[:-1], run.hidden_states[:-1]))


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


def _rotated_input(model, inputs, layer, tokens, **kwargs):
    """(rotation, the state layer `layer` received, the hidden states of a plain forward)."""
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True).hidden_states
    seen = {}
    block = decoder_of(model).layers[layer]

    def capture(module, args, kwargs):  # registered after the rotation's hook, so it sees the rotated state
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    with rotate_hidden_state(model, layer, tokens, **kwargs) as rotation:
        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                seen["after"] = model(**inputs, output_hidden_states=True).hidden_states
        finally:
            handle.remove()
    return rotation, seen, before


@pytest.mark.parametrize("toward", ["bos", "nearest", "most_similar", "position"])
def test_rotation_sets_direction_and_keeps_norm(avsr, toward):
    model, _, _, inputs = avsr
    length = inputs["attention_mask"].shape[1]
    layer, token = 1, length - 4  # real in every sample (left padding)
    toward = length - 8 if toward == "position" else toward
    rotation, seen, hidden = _rotated_input(model, inputs, layer, token, toward=toward, sinks=[length - 3])
    before, rotated = hidden[layer], seen["h"]
    bos = inputs["attention_mask"].long().argmax(-1)
    for b in range(len(rotated)):
        (target,) = rotation.targets[b]
        if toward == "bos":
            assert target == bos[b]
        elif toward == "nearest":
            assert target == token - 1  # the preceding token wins the tie with token + 1
        elif toward == "most_similar":
            cosine = torch.nn.functional.cosine_similarity(before[b], before[b, token][None], dim=-1)
            allowed = inputs["attention_mask"][b].bool().clone()
            allowed[[token, length - 3, int(bos[b])]] = False
            assert target == int(torch.where(allowed, cosine, -2.0).argmax())
        direction = torch.nn.functional.cosine_similarity(rotated[b, token], before[b, target], dim=0)
        assert direction == pytest.approx(1.0, abs=1e-5)
        assert rotated[b, token].norm() == pytest.approx(before[b, token].norm().item(), rel=1e-5)
        others = torch.ones(rotated.shape[1], dtype=torch.bool)
        others[token] = False
        torch.testing.assert_close(rotated[b, others], before[b, others])
    torch.testing.assert_close(rotation.rotated_input, rotated)


def test_nearest_non_sink_by_position():
    hidden = torch.randn(2, 10, 4)
    mask = torch.tensor([[1] * 10, [0, 0] + [1] * 8])
    # token 5: 4 and 6 are sinks, so 3 and 7 tie; the preceding one wins. Sample 1's BOS (2) is never a target.
    assert nearest_non_sink(hidden, 5, [4, 6], mask).tolist() == [3, 3]
    assert nearest_non_sink(hidden, 3, [4, 2], mask).tolist() == [1, 5]
    with pytest.raises(ValueError, match="No token left"):
        nearest_non_sink(hidden[:, :3], 1, [2])


def test_rotating_several_sinks_at_once(avsr):
    model, _, _, inputs = avsr
    length = inputs["attention_mask"].shape[1]
    tokens = [length - 6, length - 5]  # two neighbours, like the paper's sinks {20, 21}
    rotation, seen, hidden = _rotated_input(model, inputs, 1, tokens, toward="nearest", sinks=[length - 4])
    before, rotated = hidden[1], seen["h"]
    for b in range(len(rotated)):
        # neither each other nor the other sink; length - 5 ties between length - 7 and length - 3
        assert rotation.targets[b] == [length - 7, length - 7]
        for token, target in zip(tokens, rotation.targets[b]):
            direction = torch.nn.functional.cosine_similarity(rotated[b, token], before[b, target], dim=0)
            assert direction == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_rotation_traces_read_the_same_at_every_layer(avsr, layer):
    # transformers records entry 0 as layer 0's input (after the hook) but entry l >= 1 as layer l-1's output (before
    # it): Rotation.traced puts what layer l received at entry l in both cases.
    model, _, _, inputs = avsr
    token = inputs["attention_mask"].shape[1] - 4
    rotation, seen, before = _rotated_input(model, inputs, layer, token, toward="bos")
    after = seen["after"]
    shows_in_raw_tuple = not torch.allclose(after[layer][:, token], before[layer][:, token])
    assert shows_in_raw_tuple == (layer == 0)
    traced = rotation.traced(after)
    torch.testing.assert_close(traced[layer], seen["h"], rtol=0, atol=0)
    for entry in range(len(after)):
        if entry != layer:
            assert traced[entry] is after[entry]


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


@pytest.mark.parametrize("layer", [0, 2])
def test_mlp_origin_takes_its_sink_group_from_attention(avsr, layer):
    model, _, _, inputs = avsr
    mask = inputs["attention_mask"]
    origin = mlp_origin(model, inputs, layer, [3], sample=1, threshold=1.5)
    attentions = eager_forward(model, inputs).attentions
    sinks = detect_sinks(relative_attention_scores(attentions, mask), mask, threshold=1.5)
    reader = min(layer + 1, 2)  # the next layer's attention reads what this MLP wrote; the last layer reads its own
    offset = int(mask[1].argmax())
    expected = [p - offset for p in sinks.mask[1, reader].nonzero().flatten().tolist()]
    assert expected and origin.tokens == expected


# ---- report, callback, command line ----------------------------------------------------------------------------------


def _padded_first(avsr):
    """The fast inputs and token types with a left-padded sample first, so that sample and tensor positions differ."""
    _, processor, batch, fast = avsr
    order = torch.argsort(batch["attention_mask"].sum(-1))  # shortest first
    types = processor_token_types(processor, batch)[order]
    inputs = {"inputs_embeds": fast["inputs_embeds"][order], "attention_mask": fast["attention_mask"][order]}
    return inputs, types, int((1 - inputs["attention_mask"][0]).sum())


def test_analyze_writes_report_and_figures(avsr, tmp_path):
    import copy

    model = copy.deepcopy(avsr[0])
    with torch.no_grad():  # a massive feature 5 made by the MLP of decoder layer 1, as a real model has them
        decoder_of(model).layers[1].mlp.down_proj.weight[5] *= 3000.0
    inputs, types, offset = _padded_first(avsr)
    assert offset > 0
    report = analyze(model, inputs, types=types, out_dir=tmp_path, threshold=1.5, tau=20.0)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["num_layers"] == 3 and len(saved["layers"]) == 3
    assert saved["token_types"][0] == "BOS" and "audio marker" in saved["token_types"]
    assert saved["sink_rule"] == {"statistic": "relative attention score", "threshold": 1.5, "window": 4,
                                  "min_queries": 4}
    for path in report["figures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "summary.md").read_text().startswith("# Attention sinks")

    run = measure(model, inputs)
    sinks = detect_sinks(run.relative_scores, inputs["attention_mask"], threshold=1.5)
    own = {layer: [p - offset for p in sinks.positions(0, layer)] for layer in range(3)}
    assert {int(k): v for k, v in saved["intermediate_sinks"].items()} == {
        p: [l for l in range(3) if p in own[l]] for p in sorted({p for ps in own.values() for p in ps})}
    # The MLP origin's sink group comes from attention: the sinks of the layer after the one that made the massive
    # activations.
    assert saved["first_massive_entry"] == 2 and saved["mlp_origin"]["layer"] == 1
    group = [p - offset for p in sinks.mask[0, 2].nonzero().flatten().tolist()]
    assert group and saved["mlp_origin"]["tokens"] == group
    # Eq. 8 rotates all intermediate sinks of one layer at once, toward the nearest non-sink by position.
    eq8 = saved["interventions"][0]
    assert eq8["toward"] == "nearest" and eq8["tokens"] == own[eq8["layer"]] and len(eq8["tokens"]) >= 2
    every_sink = {p for ps in own.values() for p in ps} | {0}
    for token, target in zip(eq8["tokens"], eq8["targets"]):
        assert target not in every_sink
        between = range(min(token, target) + 1, max(token, target))
        assert all(p in every_sink for p in between)  # nothing closer was free
    # Eq. 9 picks a token far enough from the end for the rule to tell whether it became a sink.
    eq9 = saved["interventions"][1]
    assert eq9["toward"] == "bos" and eq9["tokens"][0] <= saved["num_tokens"] - 8
    # Eq. 10's term of sample 0 is the trainer's decorrelation loss on that sample alone (paper layers), and the
    # sinks' share of it is their part of the same sum.
    from trainer import decorrelation_loss

    hidden = tuple(h[:1] for h in run.hidden_states)
    loss = decorrelation_loss(hidden, inputs["attention_mask"][:1], layers="paper")
    assert saved["eq10"]["term"] == pytest.approx(float(loss), abs=1e-4)
    state = run.raw_hidden_states[2][0]
    cos = torch.nn.functional.cosine_similarity(state, state[offset], dim=-1)
    positions = sorted({p + offset for p in map(int, saved["intermediate_sinks"])})
    others = [p for p in range(offset + 1, inputs["attention_mask"].shape[1]) if p not in positions]
    share = float(cos[positions].square().sum() / cos[positions + others].square().sum())
    assert saved["eq10"]["share_from_intermediate_sinks"] == pytest.approx(share, abs=1e-4)
    # The figures name tokens by their position in the sample, not in the padded tensor.
    figure = plot_intervention(eq8, None)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert f"token {eq8['tokens'][0]}, before" in labels


def test_sink_monitor_callback(avsr):
    model, _, batch, _ = avsr

    class State:
        global_step = 7

    class Trainer:
        logged = []

        def log(self, values):
            self.logged.append(values)

    trainer = Trainer()
    callback = SinkMonitorCallback(dict(batch), trainer=trainer, threshold=1.5)
    model.train()
    metrics = {"eval_loss": 1.0}
    callback.on_evaluate(None, State(), None, model=model, metrics=metrics)
    assert model.training  # restored
    model.eval()
    keys = {"eval_sinks/intermediate", "eval_sinks/max_activation_ratio", "eval_sinks/prefix_cos_bos"}
    assert keys <= set(metrics) and set(trainer.logged[0]) == keys
    assert callback.history[0]["step"] == 7
    json.dumps(callback.history)

    # Independently: eager maps and hidden states, eq. 10's entries 2..L-1, the relative-score sinks.
    out = eager_forward(model, batch, output_hidden_states=True)
    mask, labels = batch["attention_mask"].bool(), batch["labels"]
    entries = range(2, len(out.hidden_states) - 1)
    ratios, cosines = [], []
    for b in range(len(mask)):
        states = [out.hidden_states[e][b][mask[b]].abs() for e in entries]
        ratios.append(max(float(h.max() / h.flatten().median()) for h in states))
        prefix = (labels[b][mask[b]] == -100).nonzero().flatten()[1:]  # BOS left out
        for e in entries:
            h = out.hidden_states[e][b][mask[b]]
            cosines += torch.nn.functional.cosine_similarity(h[prefix], h[:1], dim=-1).tolist()
    assert metrics["eval_sinks/max_activation_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-4)
    assert metrics["eval_sinks/prefix_cos_bos"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)
    sinks = detect_sinks(relative_attention_scores(out.attentions, mask), mask, threshold=1.5)
    expected = sinks.intermediate.any(1).sum(-1).float().mean()
    assert metrics["eval_sinks/intermediate"] == pytest.approx(float(expected)) and expected > 0
    assert callback.history[0]["sinks"]["intermediate_per_layer"] == sinks.intermediate.sum((0, 2)).tolist()


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


def test_sink_monitor_steps_and_profile(avsr):
    """The monitor measures at the asked optimizer steps (0 = before any update) without an evaluation, and its
    profile agrees with an independent computation from eager maps and hidden states."""
    model, processor, batch, _ = avsr
    from modeling_llama_avsr.analysis import processor_token_types, sink_profile

    types = processor_token_types(processor, batch)

    class State:
        global_step = 0

    callback = SinkMonitorCallback(dict(batch), threshold=1.5, types=types, steps=[0, 3])
    state = State()
    callback.on_train_begin(None, state, None, model=model)
    for step in (1, 2, 3, 4):
        state.global_step = step
        callback.on_step_end(None, state, None, model=model)
    assert [entry["step"] for entry in callback.history] == [0, 3]
    callback.on_train_end(None, state, None, model=model)  # not asked for: no measurement
    assert [entry["step"] for entry in callback.history] == [0, 3]
    # A run longer than the last asked step ends with a measurement at its last step, once.
    closing = SinkMonitorCallback(dict(batch), threshold=1.5, types=types, steps=[0, 3], at_train_end=True)
    state.global_step = 3
    closing.on_step_end(None, state, None, model=model)
    closing.on_train_end(None, state, None, model=model)
    state.global_step = 5
    closing.on_train_end(None, state, None, model=model)
    assert [entry["step"] for entry in closing.history] == [3, 5]
    assert closing.history[-1]["profile"] == callback.history[-1]["profile"]  # the model did not change
    quiet = SinkMonitorCallback(dict(batch), threshold=1.5, steps=[0], at_evaluation=False)
    metrics = {}
    quiet.on_evaluate(None, state, None, model=model, metrics=metrics)
    assert quiet.history == [] and metrics == {}
    profile = callback.history[0]["profile"]
    json.dumps(callback.history)

    out = eager_forward(model, batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    sinks = detect_sinks(relative_attention_scores(out.attentions, mask), mask, threshold=1.5)
    layers = range(2, len(out.attentions))
    bos = mask.long().argmax(-1)
    assert profile["bos_sink_fraction"] == pytest.approx(
        sum(bool(sinks.bos[b, l]) for b in range(len(mask)) for l in layers) / (len(mask) * len(layers)))
    sink_cos, other_cos = [], []
    for b in range(len(mask)):
        is_sink = sinks.intermediate[b, list(layers)].any(0)
        for l in layers:
            h = out.hidden_states[l][b]  # the hidden state entering decoder layer l
            cos = torch.nn.functional.cosine_similarity(h, h[bos[b]][None], dim=-1)
            for p in range(mask.shape[1]):
                if not mask[b, p] or p == bos[b]:
                    continue
                if sinks.intermediate[b, l, p]:
                    sink_cos.append(float(cos[p]))
                elif not is_sink[p]:
                    other_cos.append(float(cos[p]))
    assert profile["cos_bos"]["num_sinks"] == len(sink_cos) > 0
    assert profile["cos_bos"]["sinks"] == pytest.approx(sum(sink_cos) / len(sink_cos), abs=1e-5)
    assert profile["cos_bos"]["others"] == pytest.approx(sum(other_cos) / len(other_cos), abs=1e-5)
    by_type = profile["intermediate_by_type"]
    assert sum(by_type.values()) == pytest.approx(float(sinks.intermediate[:, list(layers)].any(1).sum(-1).float().mean()))

    # Massive features, at a tau low enough for a tiny random model to have some.
    from modeling_llama_avsr.analysis import measure

    raw = measure(model, dict(batch)).raw_hidden_states
    # the same hidden states at the real tokens (padded rows differ between eager and sdpa, and are never read)
    assert all(torch.allclose(r[mask], h[mask], atol=1e-4) for r, h in zip(raw[2:-1], out.hidden_states[2:-1]))
    tau = 3.0
    low = sink_profile(sinks, raw, mask, types, tau=tau)
    expected_bos, expected_ratio = set(), 0.0
    for l in layers:
        for b in range(len(mask)):
            h = raw[l][b].abs()
            median = h[mask[b]].median()
            expected_bos |= set((h[bos[b]] >= tau * median).nonzero().flatten().tolist())
            expected_ratio = max(expected_ratio, float((h[mask[b]] / median).max()))
    assert set(low["massive"]["features_bos"]) == expected_bos
    assert low["massive"]["max_ratio"] == pytest.approx(expected_ratio, rel=1e-5)


def test_ordinary_alignment_separates_a_shared_massive_feature_from_the_rest():
    """Ordinary tokens that carry BOS's massive feature at an ordinary size sit at a high cosine to BOS and to each
    other; with that feature zeroed, what is left of them is orthogonal to BOS (the diagnostic of RESULTS.md)."""
    from modeling_llama_avsr.analysis.report import _ordinary_alignment

    torch.manual_seed(0)
    d, n, feature = 64, 12, 7
    x = torch.zeros(1, n, d)
    x[0, 0, feature] = 1000.0  # BOS: the massive feature alone
    rest = torch.randn(n - 1, d)
    rest[:, feature] = 0
    rest = rest / rest.norm(dim=-1, keepdim=True)
    x[0, 1:] = rest
    x[0, 1:, feature] = 1.0  # every ordinary token: half its squared norm in the feature
    report = _ordinary_alignment([x, x.clone()], list(range(1, n)), 0, [feature])
    unit = torch.nn.functional.normalize(x[0, 1:], dim=-1)
    expected_pairwise = float((unit @ unit.T)[~torch.eye(n - 1, dtype=torch.bool)].mean())
    assert report["non_sinks_pairwise"] == [pytest.approx(expected_pairwise, abs=1e-4)] * 2
    assert report["non_sinks_massive_share"] == [pytest.approx(0.5, abs=1e-4)] * 2
    assert report["non_sinks_without_massive"] == [0.0, 0.0]  # the BOS has nothing outside the feature
    # cos to BOS of each ordinary token is 1 / sqrt(2): all of it from the shared feature
    assert float(torch.nn.functional.cosine_similarity(x[0, 1:], x[0, :1]).mean()) == pytest.approx(2 ** -0.5, abs=1e-5)
    assert _ordinary_alignment([x], [1], 0, [feature]) == {}  # one ordinary token has no pairs
