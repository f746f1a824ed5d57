"""TrainingArguments for Llama-AVSR: the decorrelation loss (eq. 11), generation-based evaluation and speed."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

DECORRELATION_LAYERS = ("paper", "reference")
DECORRELATION_TOKENS = ("all", "prefix")
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    light_checkpoints (`bool`, defaults to True): `checkpoint-N` folders hold only what training changes (LoRA,
        projectors, trained encoders, added-token rows; peft's adapter format) besides optimizer, scheduler and RNG
        state, and training resumes from them; False: full copies. `save_model` writes every weight either way.
    early_stopping_patience (`int`, *optional*), early_stopping_threshold (`float`): stop after this many evaluations
        without an improvement of `metric_for_best_model` by more than the threshold (transformers'
        EarlyStoppingCallback). `metric_for_best_model="wer"` is minimised.
    compile_decoder_layers (`bool`): `torch.compile` each decoder layer of the language model (one compilation serves
        all of them; evaluation and generation run them eagerly); see `LlamaAVSRForConditionalGeneration.compile_layers`.
    compile_encoder_layers (`bool`): also compile the frozen encoders' layers and AV-HuBERT's ResNet front-end.
    compile_mode (`str`, *optional*): `torch.compile`'s mode; "reduce-overhead" replays CUDA graphs, which pays most
        at small batches (the step is bound by kernel launches there). Use it with `pad_to_multiple_of`.
    pad_to_multiple_of (`int`, *optional*): left-pad every training batch's token length, and `logits_to_keep`, up to
        a multiple of this, so that compiled layers and CUDA graphs see a few shapes only. Exact (padding is masked).
    cache_encoder_outputs (`bool`): keep each training utterance's frozen-encoder tokens after its first epoch and
        reuse them (exact, and the encoders' time saved, when the training collator does not augment and the
        encoders' outputs do not depend on the rest of the batch). Costs device memory: about 6 KB a second of audio
        and 10 KB a second of video for 1024-wide encoders in bf16 at rates (16, 5).
    """

    _argument_group_name = "training (transformers' TrainingArguments, and the Llama-AVSR additions)"

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
    light_checkpoints: bool = field(
        default=True,
        metadata={"help": "checkpoint-N folders hold only the trained tensors (LoRA, projectors, trained encoders, "
                          "added-token rows) plus optimizer/scheduler/RNG state, and resume exactly; False: full "
                          "copies of every weight. The final save_model is full either way."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without improving --metric_for_best_model (needs "
                          "--eval_strategy steps|epoch). None: no early stopping."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of --metric_for_best_model that counts as an improvement."}
    )
    compile_decoder_layers: bool = field(
        default=False, metadata={"help": "torch.compile each decoder layer of the language model for training."}
    )
    compile_encoder_layers: bool = field(
        default=False, metadata={"help": "torch.compile the frozen encoders' layers and the lip ResNet too."}
    )
    compile_mode: str | None = field(
        default=None,
        metadata={"help": "torch.compile mode for the compiled layers ('reduce-overhead': CUDA graphs).",
                  "choices": list(COMPILE_MODES)},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Left-pad training batches' token length and logits_to_keep to a multiple of this (static "
                          "shapes for compiled layers and CUDA graphs)."},
    )
    cache_encoder_outputs: bool = field(
        default=False,
        metadata={"help": "Reuse each training utterance's frozen-encoder tokens after its first use (exact without "
                          "augmentation)."},
    )
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
        # transformers maximises any metric whose name does not end in "loss"; a word error rate is minimised.
        if self.greater_is_better is None and self.metric_for_best_model in ("wer", "eval_wer"):
            self.greater_is_better = False
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
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
            if self.eval_strategy == "no" or self.metric_for_best_model is None:
                raise ValueError("--early_stopping_patience needs evaluation during training: --eval_strategy steps "
                                 "(or epoch) and --metric_for_best_model (e.g. wer)")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode is not None and not (self.compile_decoder_layers or self.compile_encoder_layers):
            raise ValueError("compile_mode is given but nothing is compiled: set compile_decoder_layers and/or "
                             "compile_encoder_layers")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")


__all__ = ["AVSRTrainingArguments"]
