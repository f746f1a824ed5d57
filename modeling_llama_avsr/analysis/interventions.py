"""Rotations of hidden states (eq. 8 and 9) by a forward pre-hook on a decoder layer.

`rotate_hidden_state(model, layer=l, ...)` rewrites H^l, the l-th entry of the hidden-states tuple, on its way into
decoder layer l (0-indexed; the paper's block l+1): a token keeps its norm and takes the direction of another token.
Its effect shows in the entries after l (transformers records entry l before the hook runs). Positions are indices in
the (possibly padded) input tensor and apply to every sample of the batch.
"""

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from .hooks import decoder_of

logger = logging.getLogger(__name__)


def rotate_toward(hidden: torch.Tensor, token: int, target: torch.Tensor) -> torch.Tensor:
    """(B, N, d) copy with H[:, token] <- ||H[:, token]|| * target / ||target|| for a (B, d) target direction."""
    rotated = hidden.clone()
    norm = hidden[:, token].norm(dim=-1, keepdim=True)
    rotated[:, token] = norm * torch.nn.functional.normalize(target, dim=-1, eps=1e-12)
    return rotated


def nearest_non_sink(hidden: torch.Tensor, token: int, exclude, attention_mask: torch.Tensor | None = None):
    """(B,) index of the attended token whose state is nearest to H[:, token] by cosine, among those not in `exclude`
    (the sink positions; the token itself and each sample's BOS are always excluded). f(i) of eq. 8."""
    batch, length, _ = hidden.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.bool().to(hidden.device)
    candidates = valid.clone()
    candidates[:, token] = False
    candidates[torch.arange(batch), valid.long().argmax(-1)] = False
    for position in exclude:
        candidates[:, position] = False
    cosine = torch.nn.functional.cosine_similarity(hidden, hidden[:, token : token + 1], dim=-1)
    return torch.where(candidates, cosine, float("-inf")).argmax(-1)


@dataclass
class Rotation:
    """What a rotation did: for each sample, the position whose direction `token` took (filled during the forward)."""

    layer: int
    token: int
    toward: object
    targets: list = field(default_factory=list)


@contextlib.contextmanager
def rotate_hidden_state(model, layer: int, token: int, toward="bos", sinks=()):
    """Within the block, every forward rotates H^layer[token] (eq. 8 / 9).

    toward: "bos" (eq. 9: each sample's first attended position), "nearest" (eq. 8: the nearest non-sink token by
    cosine, `sinks` listing the sink positions to skip), or an int position.
    Only the first forward of the block is rotated (the prefill under generate)."""
    decoder = decoder_of(model)
    if not 0 <= layer < len(decoder.layers):
        raise ValueError(f"layer must index a decoder layer (0..{len(decoder.layers) - 1}), got {layer}")
    rotation = Rotation(layer=layer, token=token, toward=toward)
    state = {"attention_mask": None, "done": False}

    def capture_mask(module, args, kwargs):
        state["attention_mask"] = kwargs.get("attention_mask")

    def rotate(module, args, kwargs):
        if state["done"]:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = state["attention_mask"]
        batch = hidden.shape[0]
        if toward == "bos":
            target = torch.zeros(batch, dtype=torch.long, device=hidden.device) if mask is None \
                else mask.bool().long().argmax(-1).to(hidden.device)
        elif toward == "nearest":
            target = nearest_non_sink(hidden, token, sinks, mask)
        else:
            target = torch.full((batch,), int(toward), dtype=torch.long, device=hidden.device)
        rotation.targets = target.tolist()
        rotated = rotate_toward(hidden, token, hidden[torch.arange(batch, device=hidden.device), target])
        state["done"] = True
        logger.debug("rotated H^%d[%d] toward %s", layer, token, rotation.targets)
        if args:
            return (rotated, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": rotated}

    handles = [decoder.register_forward_pre_hook(capture_mask, with_kwargs=True),
               decoder.layers[layer].register_forward_pre_hook(rotate, with_kwargs=True)]
    try:
        yield rotation
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["Rotation", "nearest_non_sink", "rotate_hidden_state", "rotate_toward"]
