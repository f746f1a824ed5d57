"""The paper's measurements on transformers outputs: attention scores (eq. 5), massive activations (eq. 6), cosine
similarity with BOS (eq. 7), sink detection and per-layer statistics.

Everything takes batched tensors with an optional (B, N) `attention_mask` (1 = real token), so left- and right-padded
batches give the same numbers as each sample alone. "BOS" is each sample's first attended position.

Sink detection does not threshold eq. 5 directly. Under causal attention key i is seen only by the queries after it,
so eq. 5 averages the last keys over a handful of queries, and the local attention every model has (a query attends
to itself and its neighbours) puts them over any threshold of the form c / N. Detection instead uses the *relative
score* (`relative_attention_scores`): each query's attention to the key divided by what uniform causal attention
would give it (1 / the number of keys that query sees), averaged over the queries at least `window` positions after
the key. It is 1 for every key under uniform causal attention whatever its position, local attention does not enter
it, and queries near the start (which must attend to the first keys) do not inflate the BOS's expectation.
"""

from dataclasses import dataclass

import torch


def _valid(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return attention_mask.to(device=device).bool()


def bos_positions(attention_mask: torch.Tensor | None, batch: int = 1, device=None) -> torch.Tensor:
    """(B,) index of each sample's first attended position: the BOS under left or right padding."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return attention_mask.bool().long().argmax(-1)


def visible_query_counts(attention_mask: torch.Tensor | None, batch: int, length: int, device=None) -> torch.Tensor:
    """(B, N) number of attended queries that can see each key under the causal mask: attended q >= i."""
    valid = _valid(attention_mask, batch, length, device).long()
    return valid.flip(-1).cumsum(-1).flip(-1)


def attention_scores(attentions, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 for every layer: (B, L, N) from the transformers tuple of L (B, H, N, N) attention maps.

    Score of key i = attention it receives, summed over heads and over the attended queries that can see it, divided by
    H times the number of those queries (H * (N - i) without padding). Padded queries never count; values at padded
    keys are unspecified (mask them)."""
    maps = list(attentions)
    batch, heads, length, _ = maps[0].shape
    device = maps[0].device
    valid = _valid(attention_mask, batch, length, device)
    counts = visible_query_counts(valid, batch, length, device).clamp(min=1).to(torch.float32)
    scores = []
    for attn in maps:
        # where, not multiply: a fully masked (padded) query row may hold NaN, and NaN * 0 is NaN
        received = torch.where(valid[:, None, :, None], attn.float(), 0.0).sum(dim=(1, 2))
        scores.append(received / (heads * counts))
    return torch.stack(scores, dim=1)


def massive_activations(hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        tau: float = 1000.0) -> torch.Tensor:
    """Eq. 6 for one layer: bool (B, N, d), |H[i, j]| >= tau * median(|H|), the median over all features of that
    sample's attended tokens (torch's median: the lower middle value). Padded positions are False."""
    batch, length, _ = hidden_state.shape
    valid = _valid(attention_mask, batch, length, hidden_state.device)
    magnitude = hidden_state.detach().abs().float()
    return (magnitude >= tau * masked_median(magnitude, valid)[:, None, None]) & valid[..., None]


def masked_median(magnitude: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) median of (B, N, d) values over the attended tokens of each sample (torch's lower median)."""
    # Padded entries become NaN and nanmedian skips them: one vectorised call, no per-sample loop.
    flat = torch.where(valid[..., None], magnitude, float("nan")).flatten(1)
    return flat.nanmedian(dim=-1).values


def bos_cosine_similarity(hidden_states, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7 for every tuple entry: (B, L+1, N) cosine of each token's hidden state with its sample's BOS state.
    Values at padded positions are unspecified (mask them)."""
    stacked = torch.stack([h.detach().float() for h in hidden_states], dim=1)  # (B, L+1, N, d)
    batch = stacked.shape[0]
    bos = bos_positions(attention_mask, batch, stacked.device)
    bos_state = stacked[torch.arange(batch, device=stacked.device), :, bos]  # (B, L+1, d)
    return torch.nn.functional.cosine_similarity(stacked, bos_state[:, :, None, :], dim=-1, eps=1e-12)


def pairwise_cosine(hidden_state: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity between the token states of one sample's (N, d) hidden state (Fig. 3b)."""
    unit = torch.nn.functional.normalize(hidden_state.detach().float(), dim=-1, eps=1e-12)
    return unit @ unit.T


# ---- sinks -----------------------------------------------------------------------------------------------------------

# Defaults of the sink rule (README "Looking inside"): a key is a sink when the queries at least SINK_WINDOW positions
# after it give it on average more than SINK_THRESHOLD times the attention of uniform causal attention, and there are
# at least SINK_MIN_QUERIES such queries. On SmolLM2-135M and a 29-token sentence, the BOS scores 5.1-13 in layers
# 12-29 and its secondary sinks (both "the") 5.5-8.4 in layers 3-8, where no other token exceeds 4.4.
SINK_THRESHOLD = 5.0
SINK_WINDOW = 4
SINK_MIN_QUERIES = 4


def keys_seen(attention_mask: torch.Tensor | None, batch: int, length: int, device=None) -> torch.Tensor:
    """(B, N) number of attended keys each position sees under the causal mask (its uniform share is 1 / that)."""
    return _valid(attention_mask, batch, length, device).long().cumsum(-1)


def distant_query_counts(attention_mask: torch.Tensor | None, batch: int, length: int, window: int = SINK_WINDOW,
                         device=None) -> torch.Tensor:
    """(B, N) number of attended queries at least `window` positions after each key (the voters of its relative
    score)."""
    counts = visible_query_counts(attention_mask, batch, length, device)
    shifted = torch.zeros_like(counts)
    if window < length:
        shifted[:, : length - window] = counts[:, window:]
    return shifted


def relative_attention_scores(attentions, attention_mask: torch.Tensor | None = None,
                              window: int = SINK_WINDOW) -> torch.Tensor:
    """(B, L, N) relative score of every key from the transformers tuple of L (B, H, N, N) attention maps: the mean
    over attended queries q >= i + window of (mean over heads of A[q, i]) * (number of attended keys q sees). 1 under
    uniform causal attention; 0 where no query is far enough (see `distant_query_counts`)."""
    maps = list(attentions)
    batch, _, length, _ = maps[0].shape
    device = maps[0].device
    valid = _valid(attention_mask, batch, length, device)
    weight = torch.where(valid, keys_seen(valid, batch, length, device), 0).float()  # (B, q)
    position = torch.arange(length, device=device)
    far = (position[:, None] - position[None, :]) >= window  # (q, k)
    counts = distant_query_counts(valid, batch, length, window, device).clamp(min=1).float()
    scores = []
    for attn in maps:
        mean = torch.where(valid[:, None, :, None], attn.float(), 0.0).mean(1)  # (B, q, k); NaN-safe as above
        relative = torch.where(far, mean * weight[:, :, None], 0.0).sum(1)
        scores.append(relative / counts)
    return torch.stack(scores, dim=1)


@dataclass
class Sinks:
    """Sink tokens of one batch per layer. `mask` (B, L, N) marks every sink; `bos` (B, L) says whether the sample's
    BOS is one; `intermediate` (B, L, N) marks the sinks that are not the BOS. Positions are tensor positions; the
    rule's parameters are kept so that a summary says what was applied."""

    mask: torch.Tensor
    bos: torch.Tensor
    intermediate: torch.Tensor
    threshold: float
    window: int = SINK_WINDOW
    min_queries: int = SINK_MIN_QUERIES
    attention_mask: torch.Tensor | None = None

    def positions(self, sample: int, layer: int) -> list[int]:
        return self.intermediate[sample, layer].nonzero().flatten().tolist()

    def rule(self) -> dict:
        return {"statistic": "relative attention score", "threshold": self.threshold, "window": self.window,
                "min_queries": self.min_queries}

    def summary(self, types: torch.Tensor | None = None) -> dict:
        """JSON-ready description, positions in each sample's own coordinates (padding removed): per sample, the
        layers where BOS is a sink and every intermediate sink with its layers (and token type when `types`, (B, N)
        codes of tokens.py, is given); and per layer, the number of intermediate sinks summed over the batch."""
        from .tokens import TOKEN_TYPE_NAMES

        batch, layers, length = self.mask.shape
        valid = _valid(self.attention_mask, batch, length, self.mask.device).cpu()
        intermediate = self.intermediate.cpu()
        samples = []
        for b in range(batch):
            own = valid[b].long().cumsum(-1) - 1  # tensor position -> sample position
            positions = intermediate[b].any(0).nonzero().flatten().tolist()
            samples.append({
                "num_tokens": int(valid[b].sum()),
                "bos_sink_layers": self.bos[b].nonzero().flatten().tolist(),
                "intermediate_sinks": [
                    {"position": int(own[p]), "layers": intermediate[b, :, p].nonzero().flatten().tolist(),
                     **({"type": TOKEN_TYPE_NAMES[int(types[b, p])]} if types is not None else {})}
                    for p in positions],
            })
        return {"rule": self.rule(), "samples": samples,
                "intermediate_per_layer": intermediate.sum((0, 2)).tolist()}


def detect_sinks(relative_scores: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 threshold: float = SINK_THRESHOLD, min_queries: int = SINK_MIN_QUERIES,
                 window: int = SINK_WINDOW) -> Sinks:
    """Sinks from (B, L, N) relative scores (`relative_attention_scores`, or `Measurement.relative_scores`): score >
    `threshold` and at least `min_queries` attended queries `window` or more positions after the key (`window` must
    be the one the scores were computed with). The last `window + min_queries - 1` tokens of a sample can never be
    sinks: too few queries see them from afar to tell a sink from local attention."""
    batch, _, length = relative_scores.shape
    valid = _valid(attention_mask, batch, length, relative_scores.device)
    enough = distant_query_counts(valid, batch, length, window, relative_scores.device) >= min_queries
    mask = (relative_scores > threshold) & (valid & enough)[:, None, :]
    bos = bos_positions(valid, batch, relative_scores.device)
    is_bos = torch.nn.functional.one_hot(bos, length).bool()[:, None, :]
    return Sinks(mask=mask, bos=(mask & is_bos).any(-1), intermediate=mask & ~is_bos, threshold=threshold,
                 window=window, min_queries=min_queries,
                 attention_mask=None if attention_mask is None else valid)


# ---- per-layer statistics --------------------------------------------------------------------------------------------


@dataclass
class LayerActivationStats:
    """Per tuple entry l and sample: the top-k |H| values with their (token, feature), the median |H| over attended
    tokens, and ratio = top-1 / median (how "massive" the largest activation is)."""

    top_values: torch.Tensor  # (B, L+1, k)
    top_tokens: torch.Tensor  # (B, L+1, k)
    top_features: torch.Tensor  # (B, L+1, k)
    median: torch.Tensor  # (B, L+1)
    ratio: torch.Tensor  # (B, L+1)
    massive_counts: torch.Tensor  # (B, L+1) number of (token, feature) entries in eq. 6's set, over all tokens
    massive_tokens: list  # [sample][layer] -> sorted token indices with a non-empty Theta_i^l
    massive_features: list  # [sample][layer] -> sorted feature indices in the union of Theta_i^l over tokens


def layer_statistics(hidden_states, attention_mask: torch.Tensor | None = None, k: int = 5,
                     tau: float = 1000.0) -> LayerActivationStats:
    """Top-k |H|, median, top/median ratio and the eq. 6 sets for every entry of a hidden-states tuple."""
    batch, length, dim = hidden_states[0].shape
    valid = _valid(attention_mask, batch, length, hidden_states[0].device)
    tops, tokens, features, medians, counts = [], [], [], [], []
    massive_tokens = [[] for _ in range(batch)]
    massive_features = [[] for _ in range(batch)]
    for hidden in hidden_states:
        magnitude = torch.where(valid[..., None], hidden.detach().abs().float(), 0.0)
        values, flat_index = magnitude.flatten(1).topk(k, dim=-1)
        median = masked_median(magnitude, valid)
        massive = magnitude >= tau * median[:, None, None]
        massive &= valid[..., None]
        tops.append(values)
        tokens.append(flat_index // dim)
        features.append(flat_index % dim)
        medians.append(median)
        counts.append(massive.flatten(1).sum(-1))
        for b in range(batch):  # reporting only (small lists), not in any training path
            massive_tokens[b].append(massive[b].any(-1).nonzero().flatten().tolist())
            massive_features[b].append(massive[b].any(0).nonzero().flatten().tolist())
    median = torch.stack(medians, 1)
    top = torch.stack(tops, 1)
    return LayerActivationStats(
        top_values=top, top_tokens=torch.stack(tokens, 1), top_features=torch.stack(features, 1), median=median,
        ratio=top[..., 0] / median.clamp(min=torch.finfo(torch.float32).tiny), massive_counts=torch.stack(counts, 1),
        massive_tokens=massive_tokens, massive_features=massive_features,
    )


def first_massive_layer(stats: LayerActivationStats, sample: int = 0) -> int | None:
    """The first tuple entry whose eq. 6 set is non-empty (the output of decoder layer entry - 1), or None."""
    for layer, count in enumerate(stats.massive_counts[sample].tolist()):
        if count > 0:
            return layer
    return None


__all__ = [
    "LayerActivationStats",
    "SINK_MIN_QUERIES",
    "SINK_THRESHOLD",
    "SINK_WINDOW",
    "Sinks",
    "attention_scores",
    "bos_cosine_similarity",
    "bos_positions",
    "detect_sinks",
    "distant_query_counts",
    "first_massive_layer",
    "keys_seen",
    "layer_statistics",
    "massive_activations",
    "masked_median",
    "pairwise_cosine",
    "relative_attention_scores",
    "visible_query_counts",
]
