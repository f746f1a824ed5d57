"""SinkMonitorCallback: watch intermediate sinks, massive activations and BOS alignment during fine-tuning (the
paper finds intermediate sinks appear during fine-tuning, and the decorrelation loss is meant to remove them)."""

import logging

import torch
from transformers import TrainerCallback

from .hooks import measure
from .statistics import bos_cosine_similarity, bos_positions, detect_sinks, layer_statistics

logger = logging.getLogger(__name__)


def sink_metrics(model, batch, threshold: float = 5.0) -> dict:
    """Three numbers on a probe batch (averaged over its samples):

    sinks/intermediate: distinct token positions that are an intermediate sink in at least one layer;
    sinks/max_activation_ratio: largest |H| / median |H| over the decoder layers' outputs (entries 1..L-1);
    sinks/prefix_cos_bos: mean cos-to-BOS of the prefix tokens (not BOS, transcript or padding) over entries 1..L-1.
    The prefix is where labels are -100 when the batch has labels, else every attended token."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    run = measure(model, inputs)
    mask = inputs.get("attention_mask")
    batch_size, _, length = run.scores.shape
    valid = torch.ones(batch_size, length, dtype=torch.bool) if mask is None else mask.bool().cpu()
    sinks = detect_sinks(run.scores.cpu(), valid, threshold)
    stats = layer_statistics(tuple(h.cpu() for h in run.hidden_states), valid, k=1)
    inner = slice(1, len(run.hidden_states) - 1)  # entry 0 is the embeddings, the last one is after the final norm
    prefix = valid.clone()
    if batch.get("labels") is not None:
        prefix &= batch["labels"].cpu() == -100
    prefix[torch.arange(batch_size), bos_positions(valid)] = False
    cosine = bos_cosine_similarity(tuple(h.cpu() for h in run.hidden_states), valid)[:, inner]
    weights = prefix[:, None, :].expand_as(cosine).float()
    return {
        "sinks/intermediate": float(sinks.intermediate.any(1).sum(-1).float().mean()),
        "sinks/max_activation_ratio": float(stats.ratio[:, inner].amax(1).mean()),
        "sinks/prefix_cos_bos": float((cosine * weights).sum() / weights.sum().clamp(min=1)),
    }


class SinkMonitorCallback(TrainerCallback):
    """At each evaluation, measure `sink_metrics` on a fixed probe batch (given at construction, e.g. a few dev
    samples from the collator) and log them.

    The values go into the evaluation metrics (prefixed `eval_`); Trainer has already logged those when callbacks
    run, so for TensorBoard pass the trainer (`SinkMonitorCallback(probe, trainer=trainer)` or `.attach(trainer)`),
    and they are logged through `trainer.log` at the current step."""

    def __init__(self, probe_batch, threshold: float = 5.0, trainer=None):
        self.probe_batch = dict(probe_batch)
        self.threshold = threshold
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
            values = sink_metrics(model, batch, self.threshold)
        finally:
            model.train(training)
        self.history.append({"step": state.global_step, **values})
        logger.info("sink monitor at step %d: %s", state.global_step, values)
        if metrics is not None:
            metrics.update({f"eval_{key}": value for key, value in values.items()})
        if self.trainer is not None:
            self.trainer.log({f"eval_{key}": value for key, value in values.items()})


__all__ = ["SinkMonitorCallback", "sink_metrics"]
