"""ACT, the Attention Calibration Technique of Yu et al. (ICML 2024, arXiv 2406.15765): the paper's baseline.

In each chosen (layer, head), a key whose score (the attention it receives, averaged over the queries that see it)
exceeds `threshold` is a sink; every query's attention to sinks is scaled by `beta` and the freed mass is given to the
query's other keys in proportion to their attention, so each row still sums to 1. The BOS (each sample's first attended
position) is never calibrated; it keeps receiving its share of the redistribution, as in the authors' code. Only the
prefill is calibrated: decoding steps (one query) attend as eager attention does.

It runs as the attention function "act" (registered with transformers' AttentionInterface, its mask function with
AttentionMaskInterface), so it works in forward and generate:

    with act_calibration(model, heads={(10, 3), (12, 0)}, beta=0.4):
        model.generate(**batch)

The heads are chosen on a dev set by `search_act_heads` (the authors filter heads offline the same way).
"""

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .hooks import attention_implementation, attention_probabilities, decoder_of

logger = logging.getLogger(__name__)

ACT_ATTENTION = "act"


@dataclass
class ACTConfig:
    """heads: the (layer, head) pairs to calibrate; threshold: absolute per-head score above which a key is a sink
    (0.1 in the authors' scripts); beta: what sinks keep of their attention (0.4 in the authors' scripts)."""

    heads: set = field(default_factory=set)
    beta: float = 0.4
    threshold: float = 0.1

    def heads_of(self, layer: int) -> list[int]:
        return sorted(h for l, h in self.heads if l == layer)


# Attention module -> the ACT settings of the model it belongs to (the attention function only sees the module).
_SETTINGS: "weakref.WeakKeyDictionary[torch.nn.Module, ACTConfig]" = weakref.WeakKeyDictionary()


def calibrate(probs: torch.Tensor, heads, beta: float, threshold: float, bos: torch.Tensor,
              valid_queries: torch.Tensor | None = None) -> torch.Tensor:
    """ACT on (B, H, q, k) probabilities of a prefill (q == k) for the listed head indices. Returns a new tensor.

    bos: (B,) position never calibrated. valid_queries: (B, q) attended queries (padding never votes for a sink)."""
    if not heads:
        return probs
    batch, _, length, _ = probs.shape
    heads = torch.as_tensor(list(heads), device=probs.device)
    head_probs = probs[:, heads].float()  # (B, h, q, k)
    valid = torch.ones(batch, length, dtype=torch.bool, device=probs.device) if valid_queries is None \
        else valid_queries.bool()
    received = torch.where(valid[:, None, :, None], head_probs, 0.0).sum(2)  # (B, h, k)
    seen_by = valid.long().flip(-1).cumsum(-1).flip(-1).clamp(min=1)  # attended queries q >= key
    score = received / seen_by[:, None, :]
    sink = (score > threshold) & valid[:, None, :]
    sink[torch.arange(batch, device=probs.device), :, bos] = False
    sink = sink[:, :, None, :]  # same keys for every query of a head
    sink_mass = torch.where(sink, head_probs, 0.0).sum(-1, keepdim=True)
    rest = torch.where(sink, 0.0, head_probs)
    rest_mass = rest.sum(-1, keepdim=True)
    # A row that sees only sinks has nowhere to give mass: it keeps its attention (the BOS is visible to every
    # attended query, so this happens only on padding rows).
    share = torch.where(rest_mass > 0, (1.0 - beta) * sink_mass / rest_mass.clamp(min=1e-30), 0.0)
    keep = torch.where(rest_mass > 0, torch.full_like(rest_mass, beta), torch.ones_like(rest_mass))
    calibrated = torch.where(sink, head_probs * keep, rest * (1.0 + share))
    out = probs.clone()
    out[:, heads] = calibrated.to(probs.dtype)
    return out


def _act_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with ACT on the configured heads of this layer (prefill only)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    scaling = scaling if scaling is not None else module.scaling
    groups = query.shape[1] // key.shape[1]
    probs = attention_probabilities(query, key, attention_mask, scaling, groups).to(query.dtype)
    settings = _SETTINGS.get(module)
    q_len, k_len = query.shape[2], key.shape[2]
    if settings is not None and q_len > 1 and q_len == k_len:
        heads = settings.heads_of(module.layer_idx)
        if heads:
            # Attended queries and BOS from the 4D mask: a query row with no visible key is padding (left padding);
            # under right padding the padded rows see the real tokens and vote like them, as in the reference.
            visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            visible = visible[:, 0]
            diagonal = visible.diagonal(dim1=-2, dim2=-1)  # (B, q): a real query sees itself
            bos = diagonal.long().argmax(-1)
            probs = calibrate(probs, heads, settings.beta, settings.threshold, bos, diagonal)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, repeat_kv(value, groups)).transpose(1, 2).contiguous()
    return output, probs


AttentionInterface.register(ACT_ATTENTION, _act_attention)
# eager's additive float masks: the function needs the full (B, 1, q, k) mask to know which queries are padding.
AttentionMaskInterface.register(ACT_ATTENTION, eager_mask)


def enable_act(model, config: ACTConfig):
    """Switch the decoder of `model` to ACT with `config`, until `disable_act(model)`. Returns the previous
    attention implementation. Prefer the `act_calibration` context manager."""
    decoder = decoder_of(model)
    num_heads = decoder.config.num_attention_heads
    for layer, head in config.heads:
        if not (0 <= layer < len(decoder.layers) and 0 <= head < num_heads):
            raise ValueError(f"ACT head ({layer}, {head}) is outside the model's {len(decoder.layers)} layers x "
                             f"{num_heads} heads")
    for block in decoder.layers:
        _SETTINGS[block.self_attn] = config
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(ACT_ATTENTION)
    return previous


def disable_act(model, previous: str = "sdpa"):
    decoder = decoder_of(model)
    for block in decoder.layers:
        _SETTINGS.pop(block.self_attn, None)
    decoder.set_attn_implementation(previous)


@contextlib.contextmanager
def act_calibration(model, heads, beta: float = 0.4, threshold: float = 0.1):
    """Within the block, `model` (forward and generate) runs with ACT on `heads`, a set of (layer, head) pairs."""
    config = ACTConfig(heads={(int(l), int(h)) for l, h in heads}, beta=beta, threshold=threshold)
    decoder = decoder_of(model)
    with attention_implementation(model, decoder.config._attn_implementation):  # restores it on exit
        enable_act(model, config)
        try:
            yield config
        finally:
            for block in decoder.layers:
                _SETTINGS.pop(block.self_attn, None)


@dataclass
class HeadSearchResult:
    heads: set
    wer: float
    baseline_wer: float
    history: list  # (candidate heads tried, WER) in order


def search_act_heads(evaluate_wer, num_layers: int, num_heads: int, layers=None, mode: str = "greedy",
                     min_gain: float = 0.0) -> HeadSearchResult:
    """Choose ACT heads by dev-set WER. `evaluate_wer(heads: set[(layer, head)]) -> float` runs the dev set with ACT on
    those heads (e.g. inside `act_calibration`) and returns its WER; it is called 1 + len(layers) * num_heads times.

    mode "greedy": walk the layers (default: all but the first two, where the authors never calibrate) and their
    heads in order, keeping a head when adding it to the heads kept so far lowers the WER by more than `min_gain`.
    mode "individual": the authors' offline filtering: keep every head that alone beats the baseline by more than
    `min_gain` (all kept heads are then evaluated together once more for the reported WER)."""
    if mode not in ("greedy", "individual"):
        raise ValueError(f"mode must be 'greedy' or 'individual', got {mode!r}")
    layers = list(range(2, num_layers)) if layers is None else list(layers)
    baseline = float(evaluate_wer(set()))
    history = [(set(), baseline)]
    chosen, best = set(), baseline
    for layer in layers:
        for head in range(num_heads):
            candidate = (chosen | {(layer, head)}) if mode == "greedy" else {(layer, head)}
            wer = float(evaluate_wer(candidate))
            history.append((candidate, wer))
            logger.info("ACT head search: %s -> WER %.4f (best %.4f)", sorted(candidate), wer, best)
            reference = best if mode == "greedy" else baseline
            if wer < reference - min_gain:
                chosen.add((layer, head))
                if mode == "greedy":
                    best = wer
    if mode == "individual" and chosen:
        best = float(evaluate_wer(set(chosen)))
        history.append((set(chosen), best))
    return HeadSearchResult(heads=chosen, wer=best, baseline_wer=baseline, history=history)


__all__ = ["ACTConfig", "ACT_ATTENTION", "HeadSearchResult", "act_calibration", "calibrate", "disable_act",
           "enable_act", "search_act_heads"]
