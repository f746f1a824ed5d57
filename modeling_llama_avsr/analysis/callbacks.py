"""SinkMonitorCallback: watch intermediate sinks, massive activations and BOS alignment during fine-tuning (the
paper finds intermediate sinks appear during fine-tuning, and the decorrelation loss is meant to remove them)."""

import logging

import torch
from transformers import TrainerCallback

from .hooks import measure
from .statistics import (
    SINK_MIN_QUERIES,
    SINK_THRESHOLD,
    bos_cosine_similarity,
    bos_positions,
    detect_sinks,
    layer_statistics,
)

logger = logging.getLogger(__name__)


def sink_report(model, batch, threshold: float = SINK_THRESHOLD, min_queries: int = SINK_MIN_QUERIES,
                types: torch.Tensor | None = None, tau: float = 1000.0) -> dict:
    """One measured forward of the probe `batch` (under whatever attention the model runs, ACT included), summarised
    in plain JSON-ready values: `metrics` (the scalars of `sink_metrics`), `sinks` (`Sinks.summary`: every
    intermediate sink of every sample with its layers, and its token type when `types` (B, N) is given) and
    `profile` (`sink_profile`: what the paper's claims are about)."""
    run = measure(model, dict(batch))
    run.logits = None  # not needed; frees the (B, N, V) tensor early
    mask = batch.get("attention_mask")
    batch_size, _, length = run.scores.shape
    valid = torch.ones(batch_size, length, dtype=torch.bool) if mask is None else mask.bool().cpu()
    sinks = detect_sinks(run.relative_scores.cpu(), valid, threshold, min_queries, run.window)
    hidden = tuple(h.cpu() for h in run.hidden_states)
    stats = layer_statistics(hidden, valid, k=1)
    # Eq. 10's layers: tuple entries 2..L-1 (entry 0 is the embeddings, entry 1 the first layer's output, the last
    # entry is after the final norm).
    inner = slice(2, len(hidden) - 1)
    prefix = valid.clone()
    if batch.get("labels") is not None:
        prefix &= batch["labels"].cpu() == -100
    prefix[torch.arange(batch_size), bos_positions(valid)] = False
    cosine = bos_cosine_similarity(hidden, valid)[:, inner]
    weights = prefix[:, None, :].expand_as(cosine).float()
    metrics = {
        "sinks/intermediate": float(sinks.intermediate.any(1).sum(-1).float().mean()),
        "sinks/max_activation_ratio": float(stats.ratio[:, inner].amax(1).mean()),
        "sinks/prefix_cos_bos": float((cosine * weights).sum() / weights.sum().clamp(min=1)),
    }
    types = None if types is None else types.cpu()
    raw = tuple(h.cpu() for h in run.raw_hidden_states)
    return {"metrics": metrics, "sinks": sinks.summary(types),
            "profile": sink_profile(sinks, raw, valid, types, tau)}


def sink_profile(sinks, raw_hidden_states, valid: torch.Tensor, types: torch.Tensor | None = None,
                 tau: float = 1000.0) -> dict:
    """The quantities the paper's claims are about, over a probe batch, in eq. 10's layers (decoder layers 2..L-1):

    bos_sink_fraction: share of (sample, layer) where the BOS is a sink; intermediate_per_layer: intermediate sinks
    per sample in each decoder layer; intermediate_by_type: per sample, the positions that are an intermediate sink
    in any of those layers, by token type (when `types` is given); massive: eq. 6 with `tau` on the raw hidden states
    (entry l = output of decoder layer l-1, none normed): the largest |H| / median ratio and the feature and token
    type where it occurs, the feature indices massive on the BOS, on intermediate sinks and on the other tokens, and
    the share of the other tokens that carry any massive feature ("massive activations only on sinks"); cos_bos: the
    mean cosine to the BOS of the intermediate sinks (hidden state entering the layer where each is a sink) and of
    every other non-BOS token (over the same layers)."""
    from .tokens import TOKEN_TYPE_NAMES

    num_layers = sinks.mask.shape[1]
    layers = list(range(2, num_layers))  # decoder layers; a sink in layer l sees hidden-states entry l
    batch, length = valid.shape
    bos = bos_positions(valid, batch)
    is_bos = torch.nn.functional.one_hot(bos, length).bool()
    intermediate = sinks.intermediate[:, layers].cpu()  # (B, l, N)
    any_sink = intermediate.any(1)  # (B, N)
    others = valid & ~is_bos & ~any_sink
    cosine = bos_cosine_similarity(raw_hidden_states, valid)[:, layers]  # (B, l, N): entry l of each layer l
    sink_cos = cosine[intermediate]
    other_cos = cosine[others[:, None, :].expand_as(cosine)]

    massive_bos, massive_sink, massive_other = set(), set(), set()
    others_with_massive = 0
    best = (0.0, None, None)
    for entry in layers:
        hidden = raw_hidden_states[entry].float().abs()
        median = torch.stack([hidden[b][valid[b]].median() for b in range(batch)])
        ratio = hidden / median.clamp(min=torch.finfo(torch.float32).tiny)[:, None, None]
        ratio = torch.where(valid[..., None], ratio, 0.0)
        massive = ratio >= tau
        for b in range(batch):
            massive_bos.update(massive[b, bos[b]].nonzero().flatten().tolist())
            massive_sink.update(massive[b][any_sink[b]].any(0).nonzero().flatten().tolist())
            massive_other.update(massive[b][others[b]].any(0).nonzero().flatten().tolist())
        others_with_massive += int((massive.any(-1) & others).sum())
        top = float(ratio.max())
        if top > best[0]:
            b, token, feature = (int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
            kind = TOKEN_TYPE_NAMES[int(types[b, token])] if types is not None else ("BOS" if token == bos[b] else
                                                                                      "other")
            best = (top, feature, kind)
    by_type = {}
    if types is not None:
        for code in types[any_sink].tolist():
            by_type[TOKEN_TYPE_NAMES[code]] = by_type.get(TOKEN_TYPE_NAMES[code], 0) + 1 / batch
    mean = lambda values: float(values.float().mean()) if values.numel() else None  # noqa: E731
    return {
        "layers": [layers[0], layers[-1]],
        "bos_sink_fraction": float(sinks.bos[:, layers].float().mean()),
        "intermediate_per_layer": (intermediate.sum((0, 2)).float() / batch).tolist(),
        "intermediate_positions": float(any_sink.sum(-1).float().mean()),
        "intermediate_by_type": by_type,
        "massive": {"max_ratio": best[0], "max_feature": best[1], "max_token_type": best[2],
                    "features_bos": sorted(massive_bos), "features_sinks": sorted(massive_sink),
                    "features_others": sorted(massive_other),
                    "others_share": others_with_massive / max(1, int(others.sum()) * len(layers))},
        "cos_bos": {"sinks": mean(sink_cos), "others": mean(other_cos), "num_sinks": int(sink_cos.numel())},
    }


def sink_metrics(model, batch, threshold: float = SINK_THRESHOLD, min_queries: int = SINK_MIN_QUERIES) -> dict:
    """Three numbers on a probe batch (averaged over its samples):

    sinks/intermediate: distinct token positions that are an intermediate sink (`detect_sinks`) in at least one layer;
    sinks/max_activation_ratio: largest |H| / median |H| over hidden-states entries 2..L-1 (eq. 10's layers);
    sinks/prefix_cos_bos: mean cos-to-BOS of the prefix tokens (not BOS, transcript or padding) over entries 2..L-1.
    The prefix is where labels are -100 when the batch has labels, else every attended token."""
    return sink_report(model, batch, threshold, min_queries)["metrics"]


class SinkMonitorCallback(TrainerCallback):
    """Measure `sink_report` on a fixed probe batch (given at construction, e.g. a few dev samples from the
    evaluation collator) at each evaluation, and, with `steps`, at those optimizer steps too (0 = the model before
    its first update), without running an evaluation (`at_evaluation=False`: only at those steps), and with
    `at_train_end` once more after the last update (unless that step was just measured), so that a run longer than
    the last of `steps` still ends with a measurement of the model it saves.

    At an evaluation the metrics go into the evaluation metrics (prefixed `eval_`); Trainer has already logged those
    when callbacks run, so for TensorBoard pass the trainer (`SinkMonitorCallback(probe, trainer=trainer)` or
    `.attach(trainer)`), and they are logged through `trainer.log` at the current step. `history` keeps, per
    measurement, the step, the metrics, the full sink summary and the profile (plain JSON-ready values:
    `json.dumps(callback.history)`). `types` (B, N) token types of the probe (tokens.processor_token_types) name the
    sinks' token types."""

    def __init__(self, probe_batch, threshold: float = SINK_THRESHOLD, trainer=None,
                 min_queries: int = SINK_MIN_QUERIES, types: torch.Tensor | None = None, steps=(),
                 at_evaluation: bool = True, at_train_end: bool = False):
        self.probe_batch = dict(probe_batch)
        self.threshold = threshold
        self.min_queries = min_queries
        self.types = types
        self.trainer = trainer
        self.steps = {int(step) for step in steps}
        self.at_evaluation = at_evaluation
        self.at_train_end = at_train_end
        self.history = []

    def attach(self, trainer):
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _measure(self, model, step: int) -> dict:
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.probe_batch.items()}
        training = model.training
        model.eval()
        try:
            report = sink_report(model, batch, self.threshold, self.min_queries, self.types)
        finally:
            model.train(training)
        self.history.append({"step": step, **report["metrics"], "sinks": report["sinks"],
                             "profile": report["profile"]})
        logger.info("sink monitor at step %d: %s", step, report["metrics"])
        return report["metrics"]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step in self.steps:
            self._measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step in self.steps:
            self._measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        measured = self.history and self.history[-1]["step"] == state.global_step
        if model is not None and self.at_train_end and not measured:
            self._measure(model, state.global_step)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None or not self.at_evaluation:
            return
        values = self._measure(model, state.global_step)
        if metrics is not None:
            metrics.update({f"eval_{key}": value for key, value in values.items()})
        if self.trainer is not None:
            self.trainer.log({f"eval_{key}": value for key, value in values.items()})


__all__ = ["SinkMonitorCallback", "sink_metrics", "sink_profile", "sink_report"]
