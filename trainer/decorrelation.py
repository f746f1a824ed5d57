"""The decorrelation loss of "Mitigating Attention Sinks and Massive Activations in AVSR with LLMs" (eq. 10).

Intermediate attention sinks are tokens whose hidden states point the way the BOS token's does; penalising the squared
cosine similarity to BOS, layer by layer, pushes them apart. Computed from the hidden-state tuple the model returns
with `output_hidden_states=True`, so the model itself needs no change.
"""

from collections.abc import Sequence

import torch
from torch.nn import functional as F

# Keeps a zero hidden state (e.g. a zeroed placeholder) at cosine 0 instead of 0/0.
NORM_EPS = 1e-6


def layer_indices(num_entries: int, layers: str | Sequence[int]) -> list[int]:
    """Tuple indices used for a hidden-state tuple of `num_entries` = L + 1 entries (embeddings, L decoder layers)."""
    last = num_entries - 1  # = L, the entry after the final norm
    if layers == "paper":  # eq. 10: l = 2 .. L-1, L-2 layers; massive activations never occur in the first and last
        indices = list(range(2, last))
    elif layers == "reference":  # the original code: every decoder layer output but the final normed one
        indices = list(range(1, last))
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'paper', 'reference' or a list of tuple indices, got {layers!r}")
    else:
        indices = [int(i) for i in layers]
        if any(not -num_entries <= i < num_entries for i in indices):
            raise ValueError(f"layer indices {indices} out of range for {num_entries} hidden-state entries")
    if not indices:
        raise ValueError(f"layers={layers!r} selects no entry of a {num_entries}-entry hidden-state tuple")
    return indices


def decorrelation_loss(
    hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    layers: str | Sequence[int] = "paper",
) -> torch.Tensor:
    r"""Mean squared cosine similarity between each token's hidden state and its sample's BOS hidden state (eq. 10).

    Args:
        hidden_states: the transformers tuple of (B, N, d) tensors: embeddings, then one entry per decoder layer (the
            last entry after the final norm), as returned with `output_hidden_states=True`.
        attention_mask: (B, N), 1 on real tokens. Each sample's BOS is its first attended position, so left and right
            padding both work; padding never counts.
        token_mask: optional (B, N) bool: only these positions are penalised (e.g. the prefix, like the original).
        layers: `"paper"` (tuple entries 2..L-1, eq. 10), `"reference"` (entries 1..L-1, the original code) or a list
            of tuple indices.

    Returns:
        A float32 scalar: per sample, the mean of cos^2 over its eligible positions (attended, not BOS, in
        `token_mask`) and the chosen layers; then the mean over the samples that have any eligible position. If none
        has, 0 (still attached to the graph, so that backward works on every process).
    """
    indices = layer_indices(len(hidden_states), layers)
    attended = attention_mask.bool()
    length = attended.shape[-1]
    # argmax returns the first maximal index: the first attended position, whatever the padding side.
    bos = attended.to(torch.uint8).argmax(-1)
    positions = torch.arange(length, device=attended.device)
    eligible = attended & (positions != bos.unsqueeze(-1))
    if token_mask is not None:
        eligible = eligible & token_mask.to(device=attended.device, dtype=torch.bool)

    device_type = hidden_states[indices[0]].device.type
    # float32 whatever the model's dtype or an outer autocast: squared cosines near 1 lose everything in bf16.
    with torch.autocast(device_type=device_type, enabled=False):
        squared = 0.0
        for index in indices:
            unit = F.normalize(hidden_states[index].float(), dim=-1, eps=NORM_EPS)
            unit_bos = unit.gather(1, bos.view(-1, 1, 1).expand(-1, 1, unit.shape[-1]))
            squared = squared + (unit * unit_bos).sum(-1).square()  # (B, N)
        weights = eligible.float()
        counts = weights.sum(-1)
        per_sample = (squared * weights).sum(-1) / (counts * len(indices)).clamp(min=1)
        has_tokens = (counts > 0).float()
        return (per_sample * has_tokens).sum() / has_tokens.sum().clamp(min=1)


__all__ = ["decorrelation_loss"]
