"""Where massive activations come from (Sec. 3.2): one decoder layer's residual stream split into what came in, what
attention added and what the MLP added, and, inside the gated MLP, h W_gate, h W_up, SiLU(gate) * up and each latent
unit's contribution through W_down to the massive features. Read by forward hooks on the layer, its attention and its
MLP during one forward; the MLP parts are recomputed from the hooked MLP input with the model's own modules."""

from dataclasses import dataclass

import torch

from .hooks import decoder_of, measure
from .statistics import SINK_MIN_QUERIES, SINK_THRESHOLD, detect_sinks


@dataclass
class MLPOrigin:
    """For one sample and decoder layer `layer` (whose output is hidden-states entry layer + 1); F = len(features).

    residual_in / attention_out / mlp_out: (N, F) the layer input, the attention output and the MLP output at the
    features (their sum is the layer output). gate / up / act: (N, d') h W_gate, h W_up and SiLU(gate) * up.
    units: (F, k) latent units with the largest |act * W_down[f]| summed over `tokens`; unit_contributions: (N, F, k)
    act[:, unit] * W_down[f, unit] for those units."""

    layer: int
    features: list
    tokens: list
    residual_in: torch.Tensor
    attention_out: torch.Tensor
    mlp_out: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    act: torch.Tensor
    units: torch.Tensor
    unit_contributions: torch.Tensor

    def summary(self) -> dict:
        """JSON-ready numbers for the report: per feature, the mean over `tokens` vs the other tokens."""
        others = [i for i in range(self.mlp_out.shape[0]) if i not in self.tokens]
        out = {"layer": self.layer, "tokens": self.tokens, "features": {}}
        for f_index, feature in enumerate(self.features):
            units = self.units[f_index].tolist()

            def mean(values, rows):
                return float(values[rows].mean()) if rows else None

            out["features"][str(feature)] = {
                "residual_in": {"sink": mean(self.residual_in[:, f_index], self.tokens),
                                "other": mean(self.residual_in[:, f_index], others)},
                "attention_out": {"sink": mean(self.attention_out[:, f_index], self.tokens),
                                  "other": mean(self.attention_out[:, f_index], others)},
                "mlp_out": {"sink": mean(self.mlp_out[:, f_index], self.tokens),
                            "other": mean(self.mlp_out[:, f_index], others)},
                "top_units": units,
                "gate": {"sink": [mean(self.gate[:, u], self.tokens) for u in units],
                         "other": [mean(self.gate[:, u], others) for u in units]},
                "up": {"sink": [mean(self.up[:, u], self.tokens) for u in units],
                       "other": [mean(self.up[:, u], others) for u in units]},
                "down_contribution": {"sink": [mean(self.unit_contributions[:, f_index, k], self.tokens)
                                               for k in range(len(units))],
                                      "other": [mean(self.unit_contributions[:, f_index, k], others)
                                                for k in range(len(units))]},
            }
        return out


def _down_rows(down_proj: torch.nn.Module, features, width: int, like: torch.Tensor) -> torch.Tensor:
    """(F, d') rows of the effective W_down (LoRA included) for the features: the gradient of a linear map."""
    rows = []
    for feature in features:
        units = torch.zeros(width, dtype=like.dtype, device=like.device, requires_grad=True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(down_proj(units)[feature], units)
        rows.append(grad)
    return torch.stack(rows)


@torch.no_grad()
def mlp_origin(model, inputs, layer: int, features, tokens=None, sample: int = 0, top_units: int = 3,
               threshold: float = SINK_THRESHOLD, min_queries: int = SINK_MIN_QUERIES) -> MLPOrigin:
    """Attribution of `features` at decoder layer `layer` for one sample; `inputs` is a dict of model inputs.

    tokens: the sink positions (tensor positions) whose activations are compared with the rest. By default they come
    from attention, not from the activations themselves (which would make "massive activations occur on sinks"
    circular): the BOS and the intermediate sinks that `detect_sinks` finds in decoder layer `layer` + 1, the first
    attention that reads what this layer's MLP wrote (layer `layer` itself for the last layer)."""
    decoder = decoder_of(model)
    block = decoder.layers[layer]
    mlp = block.mlp
    for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
        if not hasattr(mlp, name):
            raise ValueError(f"mlp_origin needs a gated MLP (gate_proj/up_proj/down_proj/act_fn); {type(mlp).__name__} "
                             f"has no {name}")
    seen = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("residual", a[0] if a else k["hidden_states"]),
                                        with_kwargs=True),
        block.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attention", out[0])),
        mlp.register_forward_hook(lambda m, a, out: seen.update(mlp_in=a[0], mlp_out=out)),
    ]
    try:
        if tokens is None:
            run = measure(model, inputs)  # the same forward feeds the hooks
            sinks = detect_sinks(run.relative_scores, run.attention_mask, threshold, min_queries, run.window)
            reader = min(layer + 1, len(decoder.layers) - 1)
            tokens = sinks.mask[sample, reader].nonzero().flatten().tolist()
        else:
            model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    features = [int(f) for f in features]
    valid = slice(None)
    mask = inputs.get("attention_mask")
    if mask is not None:
        valid = mask[sample].bool()
    h = seen["mlp_in"][sample][valid]
    gate, up = mlp.gate_proj(h), mlp.up_proj(h)
    act = mlp.act_fn(gate) * up
    rows = _down_rows(mlp.down_proj, features, act.shape[-1], act)  # (F, d')
    contributions = act[:, None, :] * rows[None]  # (N, F, d')
    # Positions in the sample's own (unpadded) coordinates from here on.
    offset = int(valid.long().argmax()) if mask is not None else 0
    own_tokens = [t - offset for t in tokens]
    if not own_tokens:
        raise ValueError(f"No sink token in decoder layer {layer} + 1 of sample {sample} to attribute: pass tokens=")
    units = contributions[own_tokens].abs().sum(0).topk(top_units, dim=-1).indices  # (F, k)
    return MLPOrigin(
        layer=layer, features=features, tokens=own_tokens,
        residual_in=seen["residual"][sample][valid][:, features].float(),
        attention_out=seen["attention"][sample][valid][:, features].float(),
        mlp_out=seen["mlp_out"][sample][valid][:, features].float(),
        gate=gate.float(), up=up.float(), act=act.float(), units=units,
        unit_contributions=torch.gather(contributions, 2, units[None].expand(len(h), -1, -1)).float(),
    )


__all__ = ["MLPOrigin", "mlp_origin"]
