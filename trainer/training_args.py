"""TrainingArguments for Llama-AVSR: the decorrelation loss (eq. 11) and generation-based evaluation."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

DECORRELATION_LAYERS = ("paper", "reference")
DECORRELATION_TOKENS = ("all", "prefix")


@dataclass
class AVSRTrainingArguments(TrainingArguments):
    r"""
    decorrelation_weight (`float`, defaults to 0): lambda of eq. 11, L = L_CE + lambda * L_decor. 0 trains plain
        Llama-AVSR (no hidden states are requested). The paper picks lambda from {10, 1e2, 1e4}.
    decorrelation_layers (`"paper"` | `"reference"`): hidden-state tuple entries 2..L-1 as in eq. 10, or 1..L-1 as the
        original code does.
    decorrelation_tokens (`"all"` | `"prefix"`): penalise every attended non-BOS token (eq. 10), or only the prefix
        (markers, modality tokens, prompt: the tokens without labels), as the original code does.
    max_frames_per_batch (`int`, *optional*): batches filled up to this many padded video frames (`MaxFramesBatchSampler`).
    generation_num_beams, generation_max_new_tokens: decoding for the WER computed by `evaluate()`.
    """

    decorrelation_weight: float = field(
        default=0.0, metadata={"help": "lambda of L = CE + lambda * L_decor; 0 disables the decorrelation loss."}
    )
    decorrelation_layers: str = field(
        default="paper",
        metadata={"help": "Hidden-state entries: 'paper' (2..L-1, eq. 10) or 'reference' (1..L-1, original code).",
                  "choices": list(DECORRELATION_LAYERS)},
    )
    decorrelation_tokens: str = field(
        default="all",
        metadata={"help": "Tokens penalised: 'all' attended non-BOS tokens (eq. 10) or the unlabelled 'prefix'.",
                  "choices": list(DECORRELATION_TOKENS)},
    )
    max_frames_per_batch: int | None = field(
        default=None,
        metadata={"help": "Fill training batches up to this many (padded) video frames over length buckets, like the "
                          "original's max-frames batching; needs a `num_frames` column. None: fixed batch sizes."},
    )
    generation_num_beams: int = field(default=1, metadata={"help": "Beams for evaluation decoding."})
    generation_max_new_tokens: int = field(default=32, metadata={"help": "New tokens at most for evaluation decoding."})
    # Raw media columns of a datasets.Dataset are not forward() arguments, yet the collator needs them.
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Whether or not to automatically remove the columns unused by the model forward method."},
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["labels"],
        metadata={"help": "The list of keys in your dictionary of inputs that correspond to the labels."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.decorrelation_weight < 0:
            raise ValueError(f"decorrelation_weight must be >= 0, got {self.decorrelation_weight}")
        if self.decorrelation_layers not in DECORRELATION_LAYERS:
            raise ValueError(f"decorrelation_layers must be one of {DECORRELATION_LAYERS}, got "
                             f"{self.decorrelation_layers!r}")
        if self.decorrelation_tokens not in DECORRELATION_TOKENS:
            raise ValueError(f"decorrelation_tokens must be one of {DECORRELATION_TOKENS}, got "
                             f"{self.decorrelation_tokens!r}")
        if self.max_frames_per_batch is not None and self.max_frames_per_batch < 1:
            raise ValueError(f"max_frames_per_batch must be >= 1, got {self.max_frames_per_batch}")
        if self.generation_num_beams < 1 or self.generation_max_new_tokens < 1:
            raise ValueError("generation_num_beams and generation_max_new_tokens must be >= 1")


__all__ = ["AVSRTrainingArguments"]
