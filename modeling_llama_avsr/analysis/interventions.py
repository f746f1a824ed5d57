"""Rotations of hidden states (eq. 8 and 9) by a forward pre-hook on a decoder layer.

`rotate_hidden_state(model, layer=l, tokens=...)` rewrites H^l, the l-th entry of the hidden-states tuple, on its way
into decoder layer l (0-indexed; the paper's block l+1): each rotated token keeps its norm and takes the direction of
another token. Several tokens are rotated at once (the paper rotates its sinks {20, 21} together), each toward a
target chosen on the unrotated states.

What the hidden-states tuple shows: transformers records entry l >= 1 as the output of layer l-1, before the hook
runs, so entry l keeps the unrotated state and the rotation shows from entry l+1; but it records entry 0 as the input
of layer 0, after the hook, so a rotation into layer 0 already shows at entry 0. `Rotation.traced(hidden_states)`
puts what layer l actually received at entry l, so that every trace reads the same way whatever l.
Positions are indices in the (possibly padded) input tensor and apply to every sample of the batch.
"""

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from .hooks import decoder_of

logger = logging.getLogger(__name__)

TOWARD = ("bos", "nearest", "most_similar")


def rotate_toward(hidden: torch.Tensor, token: int, target: torch.Tensor) -> torch.Tensor:
    """(B, N, d) copy with H[:, token] <- ||H[:, token]|| * target / ||target|| for a (B, d) target direction."""
    rotated = hidden.clone()
    norm = hidden[:, token].norm(dim=-1, keepdim=True)
    rotated[:, token] = norm * torch.nn.functional.normalize(target, dim=-1, eps=1e-12)
    return rotated


def nearest_non_sink(hidden: torch.Tensor, token: int, exclude, attention_mask: torch.Tensor | None = None,
                     by: str = "position") -> torch.Tensor:
    """(B,) f(i) of eq. 8: the attended token nearest to `token` among those not in `exclude` (the sink positions;
    the token itself and each sample's BOS are always excluded).

    by "position": the closest position, the preceding one on a tie. by "cosine": the state most aligned with
    H[:, token] (for a sink, which points like the BOS, that is the non-sink most aligned with the BOS)."""
    batch, length, _ = hidden.shape
    valid = torch.ones(batch, length, dtype=torch.bool, device=hidden.device) if attention_mask is None \
        else attention_mask.bool().to(hidden.device)
    candidates = valid.clone()
    candidates[:, token] = False
    candidates[torch.arange(batch), valid.long().argmax(-1)] = False
    for position in exclude:
        candidates[:, position] = False
    if not candidates.any(-1).all():
        raise ValueError(f"No token left to rotate token {token} toward: every attended position is excluded")
    if by == "position":
        positions = torch.arange(length, device=hidden.device)
        distance = 2 * (positions - token).abs() + (positions > token).long()  # ties go to the preceding token
        return torch.where(candidates, distance, 4 * length).argmin(-1)
    if by == "cosine":
        cosine = torch.nn.functional.cosine_similarity(hidden, hidden[:, token : token + 1], dim=-1)
        return torch.where(candidates, cosine, float("-inf")).argmax(-1)
    raise ValueError(f"by must be 'position' or 'cosine', got {by!r}")


@dataclass
class Rotation:
    """What a rotation did, filled during the forward: per sample, the position whose direction each of `tokens`
    took (`targets[b][k]` for `tokens[k]`), and `rotated_input`, the (B, N, d) state layer `layer` received."""

    layer: int
    tokens: list
    toward: object
    targets: list = field(default_factory=list)
    rotated_input: torch.Tensor | None = None

    def traced(self, hidden_states) -> tuple:
        """The hidden-states tuple of the rotated forward with entry `layer` set to what layer `layer` received."""
        states = list(hidden_states)
        states[self.layer] = self.rotated_input
        return tuple(states)


@contextlib.contextmanager
def rotate_hidden_state(model, layer: int, tokens, toward="bos", sinks=()):
    """Within the block, the first forward rotates H^layer at `tokens` (an int or a list) (eq. 8 / 9).

    toward: "bos" (eq. 9: each sample's first attended position); "nearest" (eq. 8: the nearest non-sink position,
    skipping `sinks` and the rotated tokens); "most_similar" (eq. 8 read as the non-sink state most aligned with the
    token's); or an int position. Only the first forward of the block is rotated (the prefill under generate)."""
    decoder = decoder_of(model)
    if not 0 <= layer < len(decoder.layers):
        raise ValueError(f"layer must index a decoder layer (0..{len(decoder.layers) - 1}), got {layer}")
    if not isinstance(toward, int) and toward not in TOWARD:
        raise ValueError(f"toward must be one of {TOWARD} or a position, got {toward!r}")
    tokens = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
    rotation = Rotation(layer=layer, tokens=tokens, toward=toward)
    state = {"attention_mask": None, "done": False}

    def capture_mask(module, args, kwargs):
        state["attention_mask"] = kwargs.get("attention_mask")

    def rotate(module, args, kwargs):
        if state["done"]:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = state["attention_mask"]
        batch = hidden.shape[0]
        rows = torch.arange(batch, device=hidden.device)
        targets = []
        for token in tokens:
            if toward == "bos":
                target = torch.zeros(batch, dtype=torch.long, device=hidden.device) if mask is None \
                    else mask.bool().long().argmax(-1).to(hidden.device)
            elif toward in ("nearest", "most_similar"):
                by = "position" if toward == "nearest" else "cosine"
                target = nearest_non_sink(hidden, token, [*sinks, *tokens], mask, by=by)
            else:
                target = torch.full((batch,), int(toward), dtype=torch.long, device=hidden.device)
            targets.append(target)
        rotated = hidden
        for token, target in zip(tokens, targets):  # directions from the unrotated states
            rotated = rotate_toward(rotated, token, hidden[rows, target])
        rotation.targets = torch.stack(targets, 1).tolist()
        rotation.rotated_input = rotated.detach()
        state["done"] = True
        logger.debug("rotated H^%d%s toward %s", layer, tokens, rotation.targets)
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


__all__ = ["Rotation", "TOWARD", "nearest_non_sink", "rotate_hidden_state", "rotate_toward"]
