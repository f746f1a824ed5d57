"""ACT (attention calibration, the paper's baseline) against an independent re-implementation of the authors'
`atten_process_eval` (GATECH-EIC/ACT, models/llama_modelling_aug.py), on tiny random models."""

import json

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from modeling_llama_avsr.analysis import act_calibration, calibrate, decoder_of, search_act_heads

from analysis_models import clips, tiny_avsr


@pytest.fixture(scope="module")
def avsr():
    return tiny_avsr()


def authors_act(head: torch.Tensor, beta: float, threshold: float, prompt: int | None = None) -> torch.Tensor:
    """The authors' calibration of one head of one unpadded sample, (n, n) -> (n, n), written after their code:
    score = column sum / (n - i); the keys above the threshold, less the first (`indices[1:]`), keep beta of their
    attention; the rest is shared out in proportion to the other keys'; row 0 is reset to 1. With `prompt`, the
    scores are those of the first `prompt` queries (what the package calibrates a continuation with)."""
    n = head.shape[0]
    p = n if prompt is None else prompt
    score = head[:p, :p].sum(0) / torch.arange(p, 0, -1)
    indices = torch.nonzero(score > threshold).flatten()[1:]
    out = head.clone()
    copied = head.clone()
    available = out[:, indices].sum(1, keepdim=True) * (1 - beta)
    out[:, indices] *= beta
    copied[1:, indices] = 0
    out = out + available * copied / copied.sum(1, keepdim=True)
    out[0, 0] = 1
    return out


def _causal_probs(batch, heads, n, seed=0, boost=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, n, n, generator=g)
    if boost is not None:
        for key, value in boost.items():
            logits[..., key] += value
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)


def test_calibrate_rows_sum_to_one_and_scale_sinks():
    n = 8
    probs = _causal_probs(2, 3, n, boost={4: 4.0})  # key 4 becomes a sink
    out = calibrate(probs, heads=[0, 2], beta=0.4, threshold=0.3, exempt="bos")
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 3, n))
    torch.testing.assert_close(out[:, 1], probs[:, 1])  # head not chosen
    torch.testing.assert_close(out[:, [0, 2], :, 4], 0.4 * probs[:, [0, 2], :, 4])
    assert (out[:, [0, 2], 5:, 0] > probs[:, [0, 2], 5:, 0]).all()  # BOS is not calibrated; it gets a share
    torch.testing.assert_close(calibrate(probs, [0, 1, 2], 1.0, 0.1), probs)
    # Redistribution is proportional: the ratio between two non-sink keys is unchanged.
    ratio = out[:, 0, 7, 1] / out[:, 0, 7, 2]
    torch.testing.assert_close(ratio, probs[:, 0, 7, 1] / probs[:, 0, 7, 2])


def test_act_spares_the_first_key_above_the_threshold_as_the_authors_do():
    n = 12
    # BOS pushed under the threshold, keys 3 and 7 over it: the authors leave 3 (the first above) uncalibrated.
    probs = _causal_probs(1, 2, n, seed=0, boost={0: -6.0, 3: 3.0, 7: 3.0})
    threshold, beta = 0.25, 0.4
    score = probs[0].sum(1) / torch.arange(n, 0, -1)
    above = (score > threshold).nonzero()[:, 1]
    assert above.tolist() == [3, 7, 3, 7]  # in both heads, and the BOS under the threshold
    out = calibrate(probs, [0, 1], beta, threshold)
    for head in range(2):
        torch.testing.assert_close(out[0, head], authors_act(probs[0, head], beta, threshold))
    torch.testing.assert_close(out[0, :, 8:, 7], beta * probs[0, :, 8:, 7])
    assert (out[0, :, 8:, 3] > probs[0, :, 8:, 3]).all()  # spared, and given a share of key 7's
    # The BOS-by-position option calibrates key 3 as well.
    by_position = calibrate(probs, [0, 1], beta, threshold, exempt="bos")
    torch.testing.assert_close(by_position[0, :, 4:, 3], beta * probs[0, :, 4:, 3])
    with pytest.raises(ValueError, match="exempt"):
        act_calibration(torch.nn.Module(), set(), exempt="last").__enter__()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_act_calibrates_each_sample_of_a_batch_on_its_own(padding_side):
    lengths, total, heads = [12, 9, 7], 12, 2
    probs = torch.zeros(3, heads, total, total)
    mask = torch.zeros(3, total, dtype=torch.bool)
    alone = []
    for b, n in enumerate(lengths):
        sample = _causal_probs(1, heads, n, seed=b, boost={0: -6.0, 2: 3.0, n - 5: 3.0})[0]
        real = slice(total - n, total) if padding_side == "left" else slice(0, n)
        probs[b, :, real, real] = sample
        mask[b, real] = True
        alone.append((sample, real))
    out = calibrate(probs, [0, 1], 0.4, 0.15, valid_queries=mask)
    for b, (sample, real) in enumerate(alone):
        for head in range(heads):
            torch.testing.assert_close(out[b, head, real, real], authors_act(sample[head], 0.4, 0.15))


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
        with act_calibration(model, {(1, 0), (2, 3)}, beta=0.2, threshold=0.05) as act:
            calibrated = model(**inputs, output_attentions=True)
    assert decoder.config._attn_implementation == "sdpa"
    real = inputs["attention_mask"].bool()
    for layer, attn in enumerate(calibrated.attentions):
        rows = attn.sum(-1)[real[:, None, :].expand(-1, attn.shape[1], -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows))
    torch.testing.assert_close(calibrated.attentions[0], eager.attentions[0], atol=1e-5, rtol=0)
    assert not torch.allclose(calibrated.attentions[1][:, 0], eager.attentions[1][:, 0], atol=1e-4)
    torch.testing.assert_close(calibrated.attentions[1][:, 1:3], eager.attentions[1][:, 1:3], atol=1e-5, rtol=0)
    summary = json.loads(json.dumps(act.summary()))
    assert summary["heads"] == [[1, 0], [2, 3]] and summary["exempt"] == "first"
    assert set(summary["sinks"]) == {"1", "2"} and len(summary["sinks"]["1"]) == 3  # per sample


HEADS = {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3)}
BETA, THRESHOLD = 0.0, 0.05


def _reference_attention(prompt_end: int):
    """An eager attention function applying `authors_act` to each sample alone (its real positions), with the sinks
    of its prompt (tensor positions < prompt_end), on HEADS: an independent calibrated forward."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        logits = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * scaling + attention_mask
        probs = torch.softmax(logits.float(), -1)
        for b in range(query.shape[0]):
            real = (attention_mask[b, 0].diagonal() == 0).nonzero().flatten()
            prompt = int((real < prompt_end).sum())
            for layer, head in HEADS:
                if layer == module.layer_idx:
                    block = probs[b, head][real][:, real]
                    probs[b, head, real[:, None], real[None, :]] = authors_act(block, BETA, THRESHOLD, prompt)
        probs = probs.to(query.dtype)
        output = torch.matmul(probs, repeat_kv(value, groups)).transpose(1, 2).contiguous()
        return output, probs

    return attention


def test_act_decoding_equals_a_teacher_forced_calibrated_forward(avsr):
    model, processor, _, _ = avsr
    pairs = clips()
    prompt = dict(processor(audio=[a for a, _ in pairs], videos=[v for _, v in pairs]))  # left-padded prompts
    length = prompt["input_ids"].shape[1]
    pad = processor.tokenizer.pad_token_id
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        plain = model.generate(**prompt, **kwargs)
        with act_calibration(model, HEADS, beta=BETA, threshold=THRESHOLD):
            decoded = model.generate(**prompt, **kwargs)
    assert decoded[:, length:].tolist() != plain[:, length:].tolist()  # the calibration changes the transcripts
    full = {**prompt, "input_ids": decoded,
            "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(decoded[:, length:])], 1)}
    predicted = slice(length - 1, decoded.shape[1] - 1)  # the logits that chose each decoded token

    name = "act_reference_for_tests"
    AttentionInterface.register(name, _reference_attention(length))
    AttentionMaskInterface.register(name, eager_mask)
    decoder = decoder_of(model)
    decoder.set_attn_implementation(name)
    try:
        with torch.no_grad():
            reference = model(**full).logits
    finally:
        decoder.set_attn_implementation("sdpa")
    assert reference[:, predicted].argmax(-1).tolist() == decoded[:, length:].tolist()

    # The package's own teacher-forced forward: labels mark the transcript, so the sinks come from the prompt.
    labels = torch.where(torch.arange(decoded.shape[1]) < length, -100, decoded)
    with torch.no_grad(), act_calibration(model, HEADS, beta=BETA, threshold=THRESHOLD):
        forced = model(**full, labels=labels).logits
    real = full["attention_mask"].bool()
    torch.testing.assert_close(forced[real], reference[real], rtol=1e-4, atol=1e-4)


def test_act_decoding_step_without_a_prompt_is_an_error(avsr):
    model, processor, _, _ = avsr
    pairs = clips()
    prompt = dict(processor(audio=[a for a, _ in pairs], videos=[v for _, v in pairs]))
    with torch.no_grad():
        cache = model(**prompt, use_cache=True).past_key_values
        step = {"input_ids": prompt["input_ids"][:, -1:],
                "attention_mask": torch.cat([prompt["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)}
        with act_calibration(model, HEADS), pytest.raises(RuntimeError, match="sinks of its prompt"):
            model(**step, past_key_values=cache, position_ids=prompt["attention_mask"].sum(-1, keepdim=True))


def test_head_search_scores_each_head_alone_over_layers_2_to_L_minus_2():
    good = {(2, 1), (3, 0)}
    calls = []

    def wer(heads):  # each good head lowers the WER, any other head raises it
        calls.append(set(heads))
        return 0.3 - 0.05 * len(heads & good) + 0.01 * len(heads - good)

    result = search_act_heads(wer, num_layers=6, num_heads=2)
    assert result.heads == good and result.wer == pytest.approx(0.2) and result.baseline_wer == pytest.approx(0.3)
    # baseline, each head of layers 2..4 alone, then the kept heads together
    assert calls == [set()] + [{(l, h)} for l in (2, 3, 4) for h in (0, 1)] + [good]
    json.dumps(result.to_dict())
    greedy = search_act_heads(wer, num_layers=6, num_heads=2, mode="greedy")
    assert greedy.heads == good and len(greedy.history) == 1 + 3 * 2
