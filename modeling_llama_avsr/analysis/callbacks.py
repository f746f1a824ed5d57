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
                types: torch.Tensor | None = None) -> dict:
    """One measured forward of the probe `batch` (under whatever attention the model runs, ACT included), summarised
    in plain JSON-ready values: `metrics` (the scalars of `sink_metrics`) and `sinks` (`Sinks.summary`: every
    intermediate sink of every sample with its layers, and its token type when `types` (B, N) is given)."""
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
    return {"metrics": metrics, "sinks": sinks.summary(None if types is None else types.cpu())}


def sink_metrics(model, batch, threshold: float = SINK_THRESHOLD, min_queries: int = SINK_MIN_QUERIES) -> dict:
    """Three numbers on a probe batch (averaged over its samples):

    sinks/intermediate: distinct token positions that are an intermediate sink (`detect_sinks`) in at least one layer;
    sinks/max_activation_ratio: largest |H| / median |H| over hidden-states entries 2..L-1 (eq. 10's layers);
    sinks/prefix_cos_bos: mean cos-to-BOS of the prefix tokens (not BOS, transcript or padding) over entries 2..L-1.
    The prefix is where labels are -100 when the batch has labels, else every attended token."""
    return sink_report(model, batch, threshold, min_queries)["metrics"]


class SinkMonitorCallback(TrainerCallback):
    """At each evaluation, measure `sink_report` on a fixed probe batch (given at construction, e.g. a few dev
    samples from the collator) and log its metrics.

    The metrics go into the evaluation metrics (prefixed `eval_`); Trainer has already logged those when callbacks
    run, so for TensorBoard pass the trainer (`SinkMonitorCallback(probe, trainer=trainer)` or `.attach(trainer)`),
    and they are logged through `trainer.log` at the current step. `history` keeps, per evaluation, the step, the
    metrics and the full sink summary (plain JSON-ready values: `json.dumps(callback.history)`). `types` (B, N) token
    types of the probe (tokens.processor_token_types) name the sinks' token types in the summary."""

    def __init__(self, probe_batch, threshold: float = SINK_THRESHOLD, trainer=None,
                 min_queries: int = SINK_MIN_QUERIES, types: torch.Tensor | None = None):
        self.probe_batch = dict(probe_batch)
        self.threshold = threshold
        self.min_queries = min_queries
        self.types = types
        self.trainer = trainer
        self.history = []

    def attach(self, trainer):
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if model is None:
            return
        model = getattr(model, "module", model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.probe_batch.items()}
        training = model.training
        model.eval()
        try:
            report = sink_report(model, batch, self.threshold, self.min_queries, self.types)
        finally:
            model.train(training)
        values = report["metrics"]
        self.history.append({"step": state.global_step, **values, "sinks": report["sinks"]})
        logger.info("sink monitor at step %d: %s", state.global_step, values)
        if metrics is not None:
            metrics.update({f"eval_{key}": value for key, value in values.items()})
        if self.trainer is not None:
            self.trainer.log({f"eval_{key}": value for key, value in values.items()})


__all__ = ["SinkMonitorCallback", "sink_metrics", "sink_report"]
