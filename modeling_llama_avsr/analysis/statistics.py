"""The paper's measurements on transformers outputs: attention scores (eq. 5), massive activations (eq. 6), cosine
similarity with BOS (eq. 7), sink detection and per-layer statistics.

Everything takes batched tensors with an optional (B, N) `attention_mask` (1 = real token), so left- and right-padded
batches give the same numbers as each sample alone. "BOS" is each sample's first attended position.
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


@dataclass
class Sinks:
    """Sink tokens of one batch per layer. `mask` (B, L, N) marks every sink; `bos` (B, L) says whether the sample's
    BOS is one; `intermediate` (B, L, N) marks the sinks that are not the BOS. `threshold` is relative: a key is a sink
    when its score exceeds `threshold` times the uniform score 1 / n, n = the attended tokens of its sample."""

    mask: torch.Tensor
    bos: torch.Tensor
    intermediate: torch.Tensor
    threshold: float

    def positions(self, sample: int, layer: int) -> list[int]:
        return self.intermediate[sample, layer].nonzero().flatten().tolist()


def detect_sinks(scores: torch.Tensor, attention_mask: torch.Tensor | None = None, threshold: float = 5.0) -> Sinks:
    """Sinks from (B, L, N) attention scores: score > threshold / n, n the number of attended tokens of the sample
    (a key that every query attends uniformly would score about 1 / n)."""
    batch, _, length = scores.shape
    valid = _valid(attention_mask, batch, length, scores.device)
    uniform = 1.0 / valid.sum(-1).clamp(min=1).float()  # (B,)
    mask = (scores > threshold * uniform[:, None, None]) & valid[:, None, :]
    bos = bos_positions(valid, batch, scores.device)
    is_bos = torch.nn.functional.one_hot(bos, length).bool()[:, None, :]
    return Sinks(mask=mask, bos=(mask & is_bos).any(-1), intermediate=mask & ~is_bos, threshold=threshold)


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
    "Sinks",
    "attention_scores",
    "bos_cosine_similarity",
    "bos_positions",
    "detect_sinks",
    "first_massive_layer",
    "layer_statistics",
    "massive_activations",
    "masked_median",
    "pairwise_cosine",
    "visible_query_counts",
]
