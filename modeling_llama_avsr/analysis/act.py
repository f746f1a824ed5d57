"""ACT, the Attention Calibration Technique of Yu et al. (ICML 2024, arXiv 2406.15765): the paper's baseline.

In each chosen (layer, head), a key whose score (the attention it receives from the prompt's queries, averaged over
the prompt queries that see it) exceeds `threshold` is a sink; every query's attention to sinks is scaled by `beta`
and the freed mass is given to the query's other keys in proportion to their attention, so each row still sums to 1.

Which key is spared (`exempt`):
- "first" (default, as the authors' `atten_process_eval`, whose `indices[1:]` drops the first key above the
  threshold): the first key above the threshold. When the BOS scores above it, that is the BOS; when it scores
  under it, the first real sink stays uncalibrated.
- "bos": each sample's BOS (first attended position), whatever it scores; every other key above the threshold is
  calibrated.
Under both rules the BOS is never calibrated, and it receives its share of the redistributed mass.

The prompt and the generated tokens: sinks are found once per prompt and kept for what follows.
- A forward over a whole sequence from its start (`model(...)`, or the first step of `generate`) finds them; its
  prompt is every attended token, or, when the forward is given `labels` (teacher forcing), the attended tokens whose
  label is -100.
- A forward that extends a cache (each decoding step of `generate`) calibrates its queries with the sinks found on
  the prompt; keys after the prompt are never sinks.
So a teacher-forced forward with labels computes, position by position, the attention that greedy decoding computes:
the CE and the WER measure the same method.

Batches: every sample is calibrated with its own sinks (padding never votes). The authors' code calibrates sample 0
of a batch only (`attention_map[0]`; it ran batch 1), so the two agree at batch 1.

It runs as the attention function "act" (registered with transformers' AttentionInterface, its mask function with
AttentionMaskInterface), so it works in forward and generate:

    with act_calibration(model, heads={(10, 3), (12, 0)}, beta=0.4) as act:
        model.generate(**batch)

The heads are chosen on a dev set by `search_act_heads` (the authors filter heads offline the same way).
"""

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from .hooks import attention_probabilities, decoder_of, visible_keys

logger = logging.getLogger(__name__)

ACT_ATTENTION = "act"
EXEMPT_RULES = ("first", "bos")


@dataclass
class ACTConfig:
    """heads: the (layer, head) pairs to calibrate; threshold: absolute per-head score above which a key is a sink
    (0.1 in the authors' scripts); beta: what sinks keep of their attention (0.4 in the authors' scripts); exempt:
    which key is spared, "first" (the authors') or "bos" (see the module docstring)."""

    heads: set = field(default_factory=set)
    beta: float = 0.4
    threshold: float = 0.1
    exempt: str = "first"

    def __post_init__(self):
        if self.exempt not in EXEMPT_RULES:
            raise ValueError(f"ACT exempt must be one of {EXEMPT_RULES}, got {self.exempt!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ACT beta must lie in [0, 1], got {self.beta}")

    def heads_of(self, layer: int) -> list[int]:
        return sorted(h for l, h in self.heads if l == layer)

    def to_dict(self) -> dict:
        return {"heads": sorted([int(l), int(h)] for l, h in self.heads), "beta": self.beta,
                "threshold": self.threshold, "exempt": self.exempt}


def find_sinks(head_probs: torch.Tensor, voters: torch.Tensor, threshold: float, exempt: str = "first",
               bos: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, h, k) sinks of (B, h, q, k) probabilities of a forward without cache (q == k): keys whose attention
    from the `voters` (B, q) queries, averaged over the voters that see them, exceeds `threshold`, less the exempt
    key (the first above the threshold, or `bos` (B,), default each sample's first voter)."""
    received = torch.where(voters[:, None, :, None], head_probs.float(), 0.0).sum(2)  # (B, h, k)
    seen_by = voters.long().flip(-1).cumsum(-1).flip(-1)  # voters q >= key
    score = received / seen_by.clamp(min=1)[:, None, :]
    sinks = (score > threshold) & (seen_by > 0)[:, None, :]
    if exempt == "first":
        first = sinks.long().argmax(-1, keepdim=True)  # 0 where none is above: that entry is False already
        sinks.scatter_(-1, first, False)
    else:
        bos = voters.long().argmax(-1) if bos is None else bos
        sinks[torch.arange(len(sinks), device=sinks.device), :, bos] = False
    return sinks


def redistribute(probs: torch.Tensor, heads, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT's update of (B, H, q, k) probabilities on the listed heads, given their (B, h, k) sinks: sinks keep `beta`
    of their attention, the rest goes to the row's other keys in proportion. Returns a new tensor."""
    heads = torch.as_tensor(list(heads), device=probs.device)
    head_probs = probs[:, heads].float()
    sink = sinks[:, :, None, :]  # the same keys for every query of a head
    sink_mass = torch.where(sink, head_probs, 0.0).sum(-1, keepdim=True)
    rest = torch.where(sink, 0.0, head_probs)
    rest_mass = rest.sum(-1, keepdim=True)
    # A row that sees only sinks has nowhere to give mass: it keeps its attention (the BOS, never a sink, is visible
    # to every attended query, so this happens only on padding rows).
    share = torch.where(rest_mass > 0, (1.0 - beta) * sink_mass / rest_mass.clamp(min=1e-30), 0.0)
    keep = torch.where(rest_mass > 0, torch.full_like(rest_mass, beta), torch.ones_like(rest_mass))
    calibrated = torch.where(sink, head_probs * keep, rest * (1.0 + share))
    out = probs.clone()
    out[:, heads] = calibrated.to(probs.dtype)
    return out


def calibrate(probs: torch.Tensor, heads, beta: float, threshold: float, bos: torch.Tensor | None = None,
              valid_queries: torch.Tensor | None = None, exempt: str = "first") -> torch.Tensor:
    """ACT on (B, H, q, k) probabilities of a forward without cache (q == k) for the listed head indices, every
    attended query voting. Returns a new tensor.

    bos: (B,) position spared under exempt="bos" (default: each sample's first attended query). valid_queries: (B, q)
    attended queries (padding never votes)."""
    if not heads:
        return probs
    batch, _, length, _ = probs.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=probs.device) if valid_queries is None \
        else valid_queries.bool()
    heads = list(heads)
    sinks = find_sinks(probs[:, heads], valid, threshold, exempt, bos)
    return redistribute(probs, heads, sinks, beta)


class ACTSession:
    """The state of one calibration (`act_calibration` yields it): its config, the prompt of the current forward
    (from its labels), and per layer the (B, h, P) sinks found on the last prompt."""

    def __init__(self, config: ACTConfig):
        self.config = config
        self.sinks: dict[int, torch.Tensor] = {}
        self.prompt: torch.Tensor | None = None
        self._handles = []

    def _capture_labels(self, module, args, kwargs):
        labels = kwargs.get("labels")
        self.prompt = None if labels is None else labels == -100

    def calibrate_layer(self, layer: int, probs: torch.Tensor, mask) -> torch.Tensor:
        heads = self.config.heads_of(layer)
        if not heads:
            return probs
        batch, _, q_len, k_len = probs.shape
        visible = visible_keys(mask, q_len, k_len, probs.device).expand(batch, -1, -1)
        # A whole sequence from its start (no cache, or a pre-allocated one still empty) sees no key past its own
        # queries: that is a prompt. Anything else continues one.
        if k_len == q_len or not visible[:, :, q_len:].any():
            valid = visible[:, :, :q_len].diagonal(dim1=-2, dim2=-1)  # (B, q): a real query sees itself
            voters = valid
            if self.prompt is not None:
                if self.prompt.shape != valid.shape:
                    raise ValueError(f"ACT: labels of shape {tuple(self.prompt.shape)} do not match the forward's "
                                     f"{tuple(valid.shape)} tokens")
                voters = valid & self.prompt.to(valid.device)
            sinks = find_sinks(probs[:, heads, :, :q_len], voters, self.config.threshold, self.config.exempt,
                               valid.long().argmax(-1))
            self.sinks[layer] = sinks
            sinks = torch.nn.functional.pad(sinks, (0, k_len - q_len), value=False)
        else:
            stored = self.sinks.get(layer)
            if stored is None or stored.shape[0] != batch or stored.shape[-1] > k_len:
                raise RuntimeError("ACT: a forward that extends a cache is calibrated with the sinks of its prompt; "
                                   "run the prompt (generate's first step) inside the same act_calibration block")
            sinks = torch.nn.functional.pad(stored, (0, k_len - stored.shape[-1]), value=False)
        return redistribute(probs, heads, sinks, self.config.beta)

    def summary(self) -> dict:
        """JSON-ready: the config and, per calibrated layer, per sample and head, the key positions (tensor positions)
        found as sinks on the last prompt."""
        return {**self.config.to_dict(),
                "sinks": {str(layer): [[s.nonzero().flatten().tolist() for s in sample] for sample in sinks.cpu()]
                          for layer, sinks in sorted(self.sinks.items())}}


# Attention module -> the ACT session of the model it belongs to (the attention function only sees the module).
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, ACTSession]" = weakref.WeakKeyDictionary()


def _act_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with ACT on the configured heads of this layer."""
    scaling = scaling if scaling is not None else module.scaling
    groups = query.shape[1] // key.shape[1]
    probs = attention_probabilities(query, key, attention_mask, scaling, groups)
    session = _SESSIONS.get(module)
    if session is not None:
        probs = session.calibrate_layer(module.layer_idx, probs, attention_mask)
    probs = torch.nn.functional.dropout(probs.to(query.dtype), p=dropout, training=module.training)
    output = torch.matmul(probs, repeat_kv(value, groups)).transpose(1, 2).contiguous()
    return output, probs


AttentionInterface.register(ACT_ATTENTION, _act_attention)
# eager's additive float masks: the function needs the full (B, 1, q, k) mask to know which queries are padding.
AttentionMaskInterface.register(ACT_ATTENTION, eager_mask)


def enable_act(model, config: ACTConfig) -> str:
    """Switch the decoder of `model` to ACT with `config`, until `disable_act(model, previous)`. Returns the previous
    attention implementation. Prefer the `act_calibration` context manager."""
    decoder = decoder_of(model)
    num_heads = decoder.config.num_attention_heads
    for layer, head in config.heads:
        if not (0 <= layer < len(decoder.layers) and 0 <= head < num_heads):
            raise ValueError(f"ACT head ({layer}, {head}) is outside the model's {len(decoder.layers)} layers x "
                             f"{num_heads} heads")
    session = ACTSession(config)
    session._handles.append(model.register_forward_pre_hook(session._capture_labels, with_kwargs=True))
    for block in decoder.layers:
        _SESSIONS[block.self_attn] = session
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(ACT_ATTENTION)
    return previous


def active_session(model) -> ACTSession | None:
    """The ACT session `model` runs under, or None."""
    return _SESSIONS.get(decoder_of(model).layers[0].self_attn)


def disable_act(model, previous: str = "sdpa"):
    decoder = decoder_of(model)
    session = active_session(model)
    if session is not None:
        for handle in session._handles:
            handle.remove()
    for block in decoder.layers:
        _SESSIONS.pop(block.self_attn, None)
    decoder.set_attn_implementation(previous)


@contextlib.contextmanager
def act_calibration(model, heads, beta: float = 0.4, threshold: float = 0.1, exempt: str = "first"):
    """Within the block, `model` (forward and generate) runs with ACT on `heads`, a set of (layer, head) pairs.
    Yields the `ACTSession` (its `config`, and the sinks found on the last prompt)."""
    config = ACTConfig(heads={(int(l), int(h)) for l, h in heads}, beta=beta, threshold=threshold, exempt=exempt)
    previous = enable_act(model, config)
    try:
        yield active_session(model)
    finally:
        disable_act(model, previous)


@dataclass
class HeadSearchResult:
    heads: set
    wer: float
    baseline_wer: float
    history: list  # (candidate heads tried, WER) in order

    def to_dict(self) -> dict:
        return {"heads": sorted([int(l), int(h)] for l, h in self.heads), "wer": self.wer,
                "baseline_wer": self.baseline_wer,
                "history": [{"heads": sorted([int(l), int(h)] for l, h in heads), "wer": wer}
                            for heads, wer in self.history]}


def search_act_heads(evaluate_wer, num_layers: int, num_heads: int, layers=None, mode: str = "individual",
                     min_gain: float = 0.0) -> HeadSearchResult:
    """Choose ACT heads by dev-set WER. `evaluate_wer(heads: set[(layer, head)]) -> float` runs the dev set with ACT on
    those heads (e.g. inside `act_calibration`) and returns its WER.

    layers: default 2..L-2, as the authors' scripts (layers 2-30 of a 32-layer model).
    mode "individual" (default, the authors' offline filtering): score each head on its own, keep every head that
    alone beats the baseline by more than `min_gain`, then evaluate the kept heads together once for the reported WER
    (2 + len(layers) * num_heads calls).
    mode "greedy": walk the layers and their heads in order, keeping a head when adding it to the heads kept so far
    lowers the WER by more than `min_gain` (1 + len(layers) * num_heads calls)."""
    if mode not in ("greedy", "individual"):
        raise ValueError(f"mode must be 'greedy' or 'individual', got {mode!r}")
    layers = list(range(2, num_layers - 1)) if layers is None else list(layers)
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


__all__ = ["ACTConfig", "ACTSession", "ACT_ATTENTION", "EXEMPT_RULES", "HeadSearchResult", "act_calibration",
           "active_session", "calibrate", "disable_act", "enable_act", "find_sinks", "redistribute",
           "search_act_heads"]
