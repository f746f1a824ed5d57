"""The decorrelation loss of "Mitigating Attention Sinks and Massive Activations in AVSR with LLMs" (eq. 10).

Intermediate attention sinks are tokens whose hidden states point the way the BOS token's does; penalising the squared
cosine similarity to BOS, layer by layer, pushes them apart. Computed from the hidden-state tuple the model returns
with `output_hidden_states=True`, so the model itself needs no change.

How it is computed (the value and the gradient are those of the plain per-layer formula, in float32):
- forward: all chosen layers at once, in float32, in chunks of layers that bound the float32 temporaries; nothing of
  size (B, N, d) is kept, only (L, B, N) statistics and the BOS rows;
- backward: each layer's gradient is made when the backward pass reaches that layer (a hook on its hidden state), so
  no layer's decorrelation gradient waits in memory for the rest of the backward pass. The loss's own node only
  records its incoming gradient and hands each hidden state a free expanded zero, which makes sure the backward pass
  reaches every hidden state even when the loss is differentiated alone.
Autograd through `F.normalize(h.float())`, layer by layer, keeps two float32 copies of every chosen layer until the
backward pass and all layers' gradients from its start: about 4 % of a 3B model's peak memory at batch 8, and 15 % of
its step time in kernel launches.
"""

from collections.abc import Sequence
from contextlib import nullcontext

import torch

# Keeps a zero hidden state (e.g. a zeroed placeholder) at cosine 0 instead of 0/0, as F.normalize's eps does.
NORM_EPS = 1e-6
# Float32 bytes of hidden states processed at once in the forward pass.
CHUNK_BYTES = 64 * 2**20


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


def _chunks(hidden: Sequence[torch.Tensor]):
    """The chosen layers a few at a time, as (k, B, N, d) float32 stacks."""
    batch, length, dim = hidden[0].shape
    per_chunk = max(1, CHUNK_BYTES // max(1, batch * length * dim * 4))
    for start in range(0, len(hidden), per_chunk):
        yield torch.stack(hidden[start : start + per_chunk]).float()


def _cosines(x: torch.Tensor, bos: torch.Tensor, rows: torch.Tensor):
    """(k, B, N, d) float32 -> the (k, B, N) cosines to each sample's BOS row, the clamped norms m = max(|h|, eps)
    (F.normalize's), and the (k, B, d) BOS rows."""
    norms = torch.linalg.vector_norm(x, dim=-1).clamp_min(NORM_EPS)
    x_bos = x[:, rows, bos]
    dots = torch.matmul(x, x_bos.unsqueeze(-1)).squeeze(-1)
    return dots / (norms * norms[:, rows, bos].unsqueeze(-1)), norms, x_bos


class _GradientBox:
    """What the loss shares with its per-layer hooks: the chosen hidden states (detached: no reference cycle through
    the autograd graph, whose nodes hold the hooks) and, for one backward pass, the gradient's coefficients."""

    def __init__(self, hidden: list[torch.Tensor], bos: torch.Tensor):
        self.hidden = [h.detach() for h in hidden]
        self.bos = bos
        self.rows = torch.arange(bos.shape[0], device=bos.device)
        self.num_hooks = 0
        self.unit = self.coefficients = None
        self.pending = 0


class _WeightedSquaredCosines(torch.autograd.Function):
    """sum over layers l, samples b and positions i of weights[b, i] * cos(H_l[b, i], H_l[b, bos_b])^2.

    With c the cosine, n the norm and m = max(n, eps), the gradient at a position i (not BOS) is
    a_i H_i + b_i H_bos, a_i = -2 w_i c_i^2 [n_i > eps] / m_i^2, b_i = 2 w_i c_i / (m_i m_bos); the BOS row collects
    sum_i b_i H_i + e H_bos, e = -sum_i 2 w_i c_i^2 [n_bos > eps] / m_bos^2. All of it but the first term is known in
    the forward pass, where the float32 copies are at hand: the forward keeps a, b, H_bos and the BOS rows' gradient
    per unit of incoming gradient ((L, B, N) and (L, B, d) float32), and `_layer_gradient` adds each layer's part."""

    @staticmethod
    def forward(ctx, weights, box, *hidden):
        total, unit = 0.0, []
        for x in _chunks(hidden):
            cosines, norms, x_bos = _cosines(x, box.bos, box.rows)
            total = total + (cosines.square() * weights).sum()
            bos_norms = norms[:, box.rows, box.bos].unsqueeze(-1)
            twice = 2 * weights * cosines
            to_self = -twice * cosines * (norms > NORM_EPS) / norms.square()
            to_bos = twice / (norms * bos_norms)
            bos_self = -(twice * cosines).sum(-1, keepdim=True) * (bos_norms > NORM_EPS) / bos_norms.square()
            bos_row = torch.matmul(to_bos.unsqueeze(-2), x).squeeze(-2) + bos_self * x_bos
            unit.append((to_self, to_bos, x_bos, bos_row))
        box.unit = [torch.cat(parts) for parts in zip(*unit)]
        ctx.box = box
        ctx.handed = [(h.dtype, h.shape) if needed else None for h, needed in zip(hidden, ctx.needs_input_grad[2:])]
        return total

    @staticmethod
    def backward(ctx, grad):
        box = ctx.box
        to_self, to_bos, x_bos, bos_row = box.unit
        box.coefficients = (grad * to_self, grad * to_bos, x_bos, grad * bos_row)
        box.pending = box.num_hooks
        # An expanded zero costs no memory and makes the backward pass visit (and run the hook of) every hidden state.
        zero = {}
        handed = []
        for spec in ctx.handed:
            if spec is not None and spec[0] not in zero:
                zero[spec[0]] = torch.zeros((), dtype=spec[0], device=grad.device)
            handed.append(None if spec is None else zero[spec[0]].expand(spec[1]))
        return (None, None, *handed)


def _layer_gradient(box: _GradientBox, layer: int, grad: torch.Tensor):
    """Hook on one chosen hidden state: add that layer's decorrelation gradient to the gradient arriving there."""
    if box.coefficients is None:  # a backward pass that does not go through the loss
        return None
    to_self, to_bos, x_bos, bos_row = box.coefficients
    box.pending -= 1
    if box.pending == 0:  # the last hook of this backward pass: a later one must not reuse these coefficients
        box.coefficients = None
    # float32 arithmetic on the (exactly converted) hidden states: near cos = 1 the two terms nearly cancel.
    total = torch.addcmul(grad, to_self[layer].unsqueeze(-1), box.hidden[layer])
    total.addcmul_(to_bos[layer].unsqueeze(-1), x_bos[layer].unsqueeze(1))
    total.index_put_((box.rows, box.bos), bos_row[layer], accumulate=True)
    return total.to(grad.dtype)


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
    # The loss is linear in the squared cosines: fold the per-sample and per-sample-set means into one weight each.
    counts = eligible.sum(-1, keepdim=True)
    has_tokens = counts > 0
    weights = eligible / (counts * len(indices)).clamp(min=1) * has_tokens / has_tokens.sum().clamp(min=1)

    hidden = [hidden_states[i] for i in indices]
    # float32 whatever the model's dtype or an outer autocast: squared cosines near 1 lose everything in bf16.
    device_type = hidden[0].device.type
    autocast_off = torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) else None
    with autocast_off or nullcontext():
        if not (torch.is_grad_enabled() and any(h.requires_grad for h in hidden)):
            rows = torch.arange(bos.shape[0], device=bos.device)
            return sum((_cosines(x, bos, rows)[0].square() * weights).sum() for x in _chunks(hidden))
        box = _GradientBox(hidden, bos)
        for layer, h in enumerate(hidden):
            if h.requires_grad:
                h.register_hook(lambda grad, layer=layer: _layer_gradient(box, layer, grad))
                box.num_hooks += 1
        return _WeightedSquaredCosines.apply(weights, box, *hidden)


__all__ = ["decorrelation_loss"]
