"""Training and evaluation for Llama-AVSR: the decorrelation loss of the attention-sink paper, Trainer, WER."""

from .avsr_trainer import AVSRTrainer, EpochSeededLengthGroupedSampler, EvalCollatorTrainer, prompt_only
from .decorrelation import decorrelation_loss
from .metrics import word_error_rate
from .training_args import AVSRTrainingArguments

__all__ = [
    "AVSRTrainer",
    "AVSRTrainingArguments",
    "EpochSeededLengthGroupedSampler",
    "EvalCollatorTrainer",
    "decorrelation_loss",
    "prompt_only",
    "word_error_rate",
]
