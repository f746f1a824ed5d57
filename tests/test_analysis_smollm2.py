"""The paper's phenomena on real weights: SmolLM2-135M (Llama architecture, 30 layers, offline). Slow: a model load
and a few dozen 30-token forwards (about 20 s on 2 CPU cores)."""

import pytest
import torch

from modeling_llama_avsr.analysis import (
    act_calibration,
    attention_scores,
    bos_cosine_similarity,
    decoder_of,
    layer_statistics,
    massive_activations,
    measure,
    mlp_origin,
    rotate_hidden_state,
)

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. Then it runs into the forest, where the trees are tall and the "
        "air is cold.")
FEATURE = 507  # SmolLM2's massive feature (offline-resources.md)


@pytest.fixture(scope="module")
def smollm2(offline_cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_llama_avsr.offline_weights import convert_offline

    path = convert_offline("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, tokenizer, inputs, measure(model, inputs)


def _eager(model, **inputs):
    decoder = decoder_of(model)
    decoder.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        decoder.set_attn_implementation("sdpa")


def test_bos_sink_in_layers_12_to_29(smollm2):
    model, _, inputs, run = smollm2
    sinks = run.sinks()
    assert sinks.bos[0, 12:].all() and not sinks.bos[0, :12].any()
    assert (run.scores[0, 12:, 0] > 0.35).all()  # BOS draws 35-82% of all attention there
    assert (run.scores[0, 12:, 0] == run.scores[0, 12:].amax(-1)).all()
    # Its secondary sinks, both "the" (offline-resources.md), in layers 3-8; nothing else anywhere.
    assert set(sinks.intermediate[0].nonzero()[:, 1].tolist()) == {7, 15}
    assert sinks.intermediate[0, 3:9][:, [7, 15]].all()


def test_the_last_tokens_are_not_sinks(smollm2):
    # The old rule (eq. 5 > 5 / N) flagged the final "." in six layers and "air" in two: keys that only a few
    # queries see, with the local attention every model has.
    _, _, inputs, run = smollm2
    n = inputs["input_ids"].shape[1]
    old = run.scores[0] > 5.0 / n
    assert old[:, n - 1].sum() >= 5 and old[:, n - 4].any()
    assert not run.sinks().mask[0, :, n - 10:].any()


def test_hooked_scores_and_eq5_7_match_an_independent_computation(smollm2):
    model, _, inputs, run = smollm2
    eager = _eager(model, **inputs)
    torch.testing.assert_close(run.scores, attention_scores(eager.attentions), atol=1e-5, rtol=0)
    n = inputs["input_ids"].shape[1]
    heads = eager.attentions[0].shape[1]
    for layer in (3, 20):  # eq. 5 by hand
        received = eager.attentions[layer][0].sum(dim=(0, 1))
        expected = received / (heads * (n - torch.arange(n)))
        torch.testing.assert_close(run.scores[0, layer], expected, atol=1e-5, rtol=0)
    hidden = eager.hidden_states[15][0]
    flags = massive_activations(eager.hidden_states[15])[0]
    torch.testing.assert_close(flags, hidden.abs() >= 1000 * hidden.abs().flatten().median())
    cosine = bos_cosine_similarity(eager.hidden_states)[0, 15]
    torch.testing.assert_close(cosine, hidden @ hidden[0] / (hidden.norm(dim=-1) * hidden[0].norm()))


def test_massive_activation_at_token_0_feature_507(smollm2):
    _, _, inputs, run = smollm2
    stats = layer_statistics(run.hidden_states, inputs["attention_mask"])
    for entry in range(12, 29):  # outputs of decoder layers 11..27
        flags = massive_activations(run.hidden_states[entry])[0]
        assert flags[0, FEATURE], entry
        assert stats.top_tokens[0, entry, 0] == 0 and stats.top_features[0, entry, 0] == FEATURE
        assert flags[1:].sum() == 0  # only the BOS
        assert stats.ratio[0, entry] > 1000
    assert stats.massive_counts[0, :12].sum() == 0 and stats.massive_counts[0, 29:].sum() == 0
    assert run.hidden_states[12][0, 0, FEATURE].abs() > 15000


def test_no_massive_activation_in_the_last_layer(smollm2):
    # The paper: massive activations occur in layers 2..L-1, not in the last one. The hidden-states tuple's last entry
    # is after the final norm; the last decoder layer's own output is what eq. 6 must be read on.
    _, _, inputs, run = smollm2
    assert not massive_activations(run.last_layer_output).any()
    assert massive_activations(run.hidden_states[28]).any()  # the output of layer 27 still has them
    stats = layer_statistics(run.raw_hidden_states)
    assert stats.ratio[0, 30] < 1000 < stats.ratio[0, 28]


def test_massive_activation_originates_in_the_mlp_of_layer_11(smollm2):
    model, _, inputs, _ = smollm2
    origin = mlp_origin(model, inputs, layer=11, features=[FEATURE])
    assert origin.tokens == [0]  # the sinks of layer 12, from attention: the BOS alone
    bos = origin.summary()["features"][str(FEATURE)]
    assert abs(bos["mlp_out"]["sink"]) > 10000
    assert abs(bos["residual_in"]["sink"]) < 200 and abs(bos["attention_out"]["sink"]) < 200
    # Sec. 3.2: the top units' h W_gate is large and positive on the sink and negative on the other tokens.
    unit = origin.units[0, 0]
    assert origin.gate[0, unit] > 10 and (origin.gate[1:, unit] < 0).float().mean() > 0.9


@pytest.mark.parametrize("toward", ["nearest", "most_similar"])
def test_rotating_the_bos_aligned_sinks_away_removes_them_and_their_massive_activations(smollm2, toward):
    model, _, inputs, run = smollm2
    sinks = run.sinks()
    # SmolLM2's secondary sinks in layers 3-8: "the" twice, aligned with BOS, carrying feature 507 (~500).
    tokens = [7, 15]
    for token in tokens:
        assert bos_cosine_similarity(run.hidden_states)[0, 5, token] > 0.9
        assert massive_activations(run.hidden_states[5], tau=100)[0, token, FEATURE]
    with rotate_hidden_state(model, layer=2, tokens=tokens, toward=toward) as rotation:  # both at once, as eq. 8
        after = measure(model, inputs)
    if toward == "nearest":
        assert rotation.targets == [[6, 14]]  # the preceding tokens, "over" and "into"
    assert not set(rotation.targets[0]) & {0, *tokens}
    after_sinks = after.sinks()
    assert not after_sinks.intermediate[0, 2:10][:, tokens].any() and sinks.intermediate[0, 3:9][:, tokens].all()
    for entry in range(3, 10):
        for token in tokens:
            assert not massive_activations(after.hidden_states[entry], tau=100)[0, token].any()
            before_value = run.hidden_states[entry][0, token, FEATURE].abs()
            assert after.hidden_states[entry][0, token, FEATURE].abs() < 0.3 * before_value


def test_rotating_an_ordinary_token_toward_bos_creates_a_sink_and_a_massive_activation(smollm2):
    model, tokenizer, inputs, run = smollm2
    token = 3  # "brown"
    assert tokenizer.convert_ids_to_tokens(int(inputs["input_ids"][0, token])) == "Ġbrown"
    assert not any(massive_activations(h)[0, token].any() for h in run.hidden_states)
    with rotate_hidden_state(model, layer=11, tokens=token, toward="bos") as rotation:
        after = measure(model, inputs)
    assert rotation.targets == [[0]]
    for entry in range(12, 29):
        flags = massive_activations(after.hidden_states[entry])[0]
        assert flags[token, FEATURE] and flags[0, FEATURE]
    # It now shares the BOS's sink: each draws about half of what the BOS drew alone (5-7 x uniform instead of 8-13),
    # so both sit around the threshold; before, the token drew under uniform attention.
    assert (run.relative_scores[0, 12:, token] < 1).all()
    relative = after.relative_scores[0, 12:]
    assert (relative[:, token] > 0.85 * relative[:, 0]).all() and (relative[:, token] > 2.5).all()
    assert after.sinks().intermediate[0, 12:, token].float().mean() > 0.5


def test_act_with_beta_one_leaves_smollm2_logits_unchanged(smollm2):
    model, _, inputs, _ = smollm2
    eager = _eager(model, **inputs)
    heads = {(layer, head) for layer in range(2, 30) for head in range(9)}
    with torch.no_grad(), act_calibration(model, heads, beta=1.0):
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, eager.logits, atol=1e-4, rtol=1e-5)
    with torch.no_grad(), act_calibration(model, heads, beta=0.4, threshold=0.1):
        calibrated = model(**inputs, output_attentions=True)
    for attn in calibrated.attentions:
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    # Calibration moves attention off the intermediate sinks but leaves the BOS alone (it even gains).
    assert calibrated.attentions[5][0, :, 10:, 0].mean() >= eager.attentions[5][0, :, 10:, 0].mean()
