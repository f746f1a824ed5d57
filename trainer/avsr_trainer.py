"""AVSRTrainer: Trainer with the decorrelation loss (eq. 11), separate CE / decorrelation logs and WER evaluation.

Batches are `LlamaAVSRProcessor` outputs with labels (left-padded; the collator may add more padding). Evaluation
batches are the same teacher-forced batches: the eval loss uses them as they are, and the prompt-only inputs that
`generate()` needs are rebuilt from them with `prompt_only` (the transcript and EOS are exactly the labelled tokens);
the media are encoded once for both.

Checkpoints and resumption. `checkpoint-N` folders are light checkpoints (`light_checkpoints`, on by default): only
what training changes (LoRA, projectors, trained encoders, the added-token rows) in peft's adapter format, beside
Trainer's optimizer, scheduler, RNG and trainer state; `save_model` still writes every weight. A resumed run is
exact: the group_by_length order of an epoch is drawn from (seed, epoch), not from the global RNG, and the training
collator is told the epoch (`set_epoch`) so that it can draw each utterance's augmentation from (seed, epoch,
utterance) (`AVSRDataCollator` does).
"""

import logging
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import seed_worker
from transformers.trainer import TRAINING_ARGS_NAME

from modeling_llama_avsr.modeling_llama_avsr import LlamaAVSRMediaTokens

from .decorrelation import decorrelation_loss
from .metrics import word_error_rate
from .training_args import AVSRTrainingArguments

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Keys of a teacher-forced batch that generate() must not see.
TEACHER_FORCING_KEYS = ("labels", "logits_to_keep", "position_ids")
# The media inputs of a batch, which the encoders turn into `media_tokens`.
MEDIA_KEYS = ("input_features", "feature_attention_mask", "pixel_values_videos", "video_attention_mask")
# Row columns that identify an utterance's media (the loaders' columns), for `cache_encoder_outputs`.
MEDIA_KEY_COLUMNS = ("audio_path", "video_path")


def prefix_mask(attention_mask: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(B, N) bool: attended positions before the first labelled one, i.e. BOS, markers, modality tokens and prompt.

    The last prompt token predicts the first transcript token but carries no label itself, so it is prefix."""
    attended = attention_mask.bool()
    if labels is None:
        return attended
    return attended & (labels.ne(IGNORE_INDEX).cumsum(-1) == 0)


def prompt_only(inputs: Mapping[str, torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The generation inputs of a teacher-forced batch: each row keeps its attended unlabelled tokens, left-padded.

    Equals what the processor returns for the same clips without `text`. Media tensors are passed through unchanged;
    `labels` (and `logits_to_keep`, `position_ids`) are dropped. One host synchronisation (the new width), which is
    fine at evaluation time.
    """
    input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    if inputs.get("labels") is not None:
        keep = keep & inputs["labels"].eq(IGNORE_INDEX)
    counts = keep.sum(-1, keepdim=True)
    width = int(counts.max())
    # Kept tokens go, in order, to the right end of a row; dropped ones to a spare last column cut off afterwards.
    target = torch.where(keep, width - counts + keep.long().cumsum(-1) - 1, width)
    batch = input_ids.shape[0]
    ids = input_ids.new_full((batch, width + 1), pad_token_id).scatter_(1, target, input_ids)
    mask = attention_mask.new_zeros((batch, width + 1)).scatter_(1, target, keep.to(attention_mask.dtype))
    generation_inputs = {k: v for k, v in inputs.items() if k not in TEACHER_FORCING_KEYS}
    generation_inputs["input_ids"] = ids[:, :width].masked_fill(~mask[:, :width].bool(), pad_token_id)
    generation_inputs["attention_mask"] = mask[:, :width]
    return generation_inputs


class LogitsToKeepCollator:
    """Wraps a collator to add `logits_to_keep` = longest labelled span + 1 to left-padded labelled batches.

    It runs in the data loader, on the host, before the batch moves to the device: the model then applies its LM head
    to the labelled end of the rows only (the prefix needs no logits) without a device-to-host synchronisation.

    pad_to_multiple_of: also left-pad the token length, and round `logits_to_keep` up, to a multiple of this (masked
        padding: exact), so that compiled layers and CUDA graphs see few shapes. Needs `pad_token_id`.
    media_keys: add `media_keys`, each row's `audio_path` / `video_path`, for `cache_encoder_outputs`.
    """

    def __init__(self, collator, pad_to_multiple_of: int | None = None, pad_token_id: int | None = None,
                 media_keys: bool = False):
        if pad_to_multiple_of is not None and pad_token_id is None:
            raise ValueError("pad_to_multiple_of needs the pad_token_id to pad with")
        self.collator = collator
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.media_keys = media_keys

    def set_epoch(self, epoch: int):
        if hasattr(self.collator, "set_epoch"):
            self.collator.set_epoch(epoch)

    def __call__(self, features):
        batch = self.collator(features)
        labels, attention_mask = batch.get("labels"), batch.get("attention_mask")
        if self.media_keys:
            batch["media_keys"] = [_media_key(row) for row in features]
        if labels is None or "logits_to_keep" in batch or not isinstance(labels, torch.Tensor):
            return batch
        left_padded = attention_mask is None or bool(attention_mask[:, -1].all())
        labelled = labels.ne(IGNORE_INDEX)
        if left_padded and labelled.any() and labels.device.type == "cpu":
            if self.pad_to_multiple_of is not None:
                batch = self._pad_left(batch)
                labels = batch["labels"]
                labelled = labels.ne(IGNORE_INDEX)
            # The first labelled position needs the logits of the position before it (labels shift by one).
            first = torch.where(labelled.any(-1), labelled.to(torch.uint8).argmax(-1), labels.shape[-1])
            keep = int(labels.shape[-1] - first.min()) + 1
            if self.pad_to_multiple_of is not None:
                keep = min(-(-keep // self.pad_to_multiple_of) * self.pad_to_multiple_of, labels.shape[-1])
            batch["logits_to_keep"] = keep
        return batch

    @property
    def augments(self):
        return getattr(self.collator, "augments", None)

    def _pad_left(self, batch):
        length = batch["input_ids"].shape[-1]
        extra = -length % self.pad_to_multiple_of
        if extra == 0:
            return batch
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "position_ids": 0}
        for name, value in fill.items():
            if isinstance(batch.get(name), torch.Tensor):
                batch[name] = torch.nn.functional.pad(batch[name], (extra, 0), value=value)
        return batch


def half_precision_padding_warning(dtype: torch.dtype, device_type: str, pad_to_multiple_of: int | None) -> str | None:
    """Measured on an H200 (torch 2.11): with bf16 weights, `pad_to_multiple_of` (which left-pads every row, the
    longest included) gives NaN gradients at the first step, eager and compiled alike; bf16 without it and fp32 with
    it train normally, and the CPU is finite in every combination. The trainer's non-finite stop would catch it a step
    later; this says why before the run starts."""
    if pad_to_multiple_of is None or device_type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"pad_to_multiple_of={pad_to_multiple_of} with {name} weights on CUDA gave NaN gradients at step 1 on an "
            f"H200 (torch 2.11; float32, or {name} without the padding, trained normally): if this run stops on a "
            "non-finite gradient, drop pad_to_multiple_of or use --dtype float32")


def _media_key(row) -> tuple:
    key = tuple(row.get(column) for column in MEDIA_KEY_COLUMNS)
    if all(part is None for part in key):
        raise ValueError(f"cache_encoder_outputs identifies an utterance by its {MEDIA_KEY_COLUMNS} columns; this row "
                         f"has neither (columns: {sorted(row)})")
    return key


def apply_liger_kernel_to_text_model(model, **kernel_config) -> None:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on the language model inside a LlamaAVSR model.

    Trainer's `use_liger_kernel` looks the model type up and finds nothing for "llama_avsr"; the text model's type
    ("llama") has them. Liger patches that model's modules and its modeling module's RoPE function, as it does for a
    plain Llama under Trainer. Its loss kernels stay off: the loss is ours, computed on `logits_to_keep` positions."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ImportError("use_liger_kernel needs Liger's kernels (Triton, so a GPU): pip install liger-kernel") from e

    config = {"rope": True, "rms_norm": True, "swiglu": True, **kernel_config}
    config.update(cross_entropy=False, fused_linear_cross_entropy=False)
    _apply_liger_kernel_to_instance(model=model.model.language_model, **config)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' group_by_length sampler, drawing each epoch's order from a generator seeded with seed + epoch
    (as accelerate's seedable random sampler does) instead of the global RNG, whose state at the start of an epoch
    a resumed run cannot reproduce. Trainer calls `set_epoch` before every epoch, the resumed one included."""

    def __init__(self, batch_size: int, lengths, seed: int = 0):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class _CollatorEpoch(TrainerCallback):
    """Tells the training collator which epoch starts (DataLoader workers fork after this, so they see it too), and
    the max-frames batch sampler: Trainer reaches a batch sampler through accelerate's wrappers itself, except when a
    resumed run on several processes skips batches (SkipBatchSampler around BatchSamplerShard hides it), and that
    sampler's epoch-0 order would then finish the resumed epoch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is epoch + fraction done: an integer here, or mid-epoch when a run resumes
        epoch = int(state.epoch or 0)
        if hasattr(self.trainer.data_collator, "set_epoch"):
            self.trainer.data_collator.set_epoch(epoch)
        if self.trainer._max_frames_sampler is not None:
            self.trainer._max_frames_sampler.set_epoch(epoch)


def check_fsdp_ignored_modules(model, ignored_modules) -> None:
    """FSDP leaves its ignored modules alone: each process keeps its own copy and their gradients are never averaged
    across processes. That is right for frozen encoders (examples/accelerate/fsdp.yaml) and silently wrong for a
    module that trains, whose copies would drift apart: refuse it. `ignored_modules` is accelerate's
    `fsdp_ignored_modules`: a regular expression matched against full module names, or modules."""
    if ignored_modules is None:
        return
    if isinstance(ignored_modules, str):
        pattern = re.compile(ignored_modules)
        ignored = [(name, module) for name, module in model.named_modules() if pattern.fullmatch(name)]
    else:
        names = {id(module): name for name, module in model.named_modules()}
        ignored = [(names.get(id(module), type(module).__name__), module) for module in ignored_modules]
    for name, module in ignored:
        trained = [n for n, p in module.named_parameters() if p.requires_grad]
        if trained:
            raise ValueError(
                f"FSDP ignores {name} (fsdp_ignored_modules {ignored_modules!r}) but it has trainable parameters "
                f"({trained[0]}, ...): their gradients would not be averaged across processes. Freeze it "
                "(freeze_audio_encoder / freeze_video_encoder) or take it out of fsdp_ignored_modules."
            )


def _is_light_checkpoint(folder) -> bool:
    from modeling_llama_avsr.modeling_llama_avsr import ADAPTER_WEIGHTS_NAME

    folder = Path(folder)
    return (folder / ADAPTER_WEIGHTS_NAME).is_file() and not any(folder.glob("model*.safetensors"))


class EvalCollatorTrainer(Trainer):
    """Trainer whose evaluate() and predict() batches come from `eval_data_collator`, if given (e.g. without
    augmentation, or with a fixed noise condition); `data_collator` builds the training ones."""

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def _prepare_eval_collator(self, collator):
        return collator

    @contextmanager
    def _evaluation_collator(self):
        if self.eval_data_collator is None:
            yield
            return
        training_collator = self.data_collator
        self.data_collator = self._prepare_eval_collator(self.eval_data_collator)
        try:
            yield
        finally:
            self.data_collator = training_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_collator():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_collator():
            return super().get_test_dataloader(test_dataset)


class AVSRTrainer(EvalCollatorTrainer):
    """Trainer for `LlamaAVSRForConditionalGeneration`.

    - loss: CE through the model (which honours `num_items_in_batch`) + `decorrelation_weight` * `decorrelation_loss`
      of the hidden states, scaled like the CE under gradient accumulation and data parallelism;
    - logs `ce_loss` and `decor_loss` next to `loss` (and `eval_ce_loss`, `eval_decor_loss`, `eval_wer` from
      `evaluate()`; the decorrelation is always measured in evaluation, so a lambda = 0 baseline reports it too);
    - evaluation decodes with `model.generate` from the prompt-only part of each batch (`prompt_only`) and, unless a
      `compute_metrics` is given, reports corpus WER against the decoded labels.

    Pass the processor as `processing_class`: it decodes predictions and gives the pad id. `eval_data_collator`, if
    given, builds the batches of evaluate() and predict() (`EvalCollatorTrainer`); `data_collator` the training ones.

    Speed (AVSRTrainingArguments): compiled layers (`compile_decoder_layers`, `compile_mode`, `pad_to_multiple_of`),
    `cache_encoder_outputs`, and `use_liger_kernel`, applied here to the text model.
    """

    def __init__(self, model=None, args: AVSRTrainingArguments | None = None, *trainer_args,
                 eval_data_collator=None, **kwargs):
        if args is None:
            args = AVSRTrainingArguments(output_dir="trainer_output")
        elif not isinstance(args, AVSRTrainingArguments):
            raise TypeError(f"AVSRTrainer needs AVSRTrainingArguments, got {type(args).__name__}")
        # Training batches are augmented; evaluation ones are not, or carry a fixed noise condition.
        super().__init__(model, args, *trainer_args, eval_data_collator=eval_data_collator, **kwargs)
        self._check_processor()
        if self.data_collator is not None and not isinstance(self.data_collator, LogitsToKeepCollator):
            pad = self._pad_token_id() if args.pad_to_multiple_of is not None else None
            self.data_collator = LogitsToKeepCollator(self.data_collator, args.pad_to_multiple_of, pad,
                                                      media_keys=args.cache_encoder_outputs)
        self._warn_half_precision_padding()
        if self.compute_metrics is None and self.processing_class is not None:
            self.compute_metrics = self._word_error_rate
        # Detached running sums of what compute_loss adds to the loss, per phase; reduced in log() / evaluation_loop.
        self._aux_sums = {"train": {}, "eval": {}}
        self._aux_counts = {"train": 0.0, "eval": 0.0}
        self._saving_checkpoint = False
        self._max_frames_sampler = None
        self.add_callback(_CollatorEpoch(self))
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            # accelerate turns an FSDP configuration into FSDP on accelerator devices only
            logger.warning("FSDP was configured but accelerate runs %s here (no GPU): the model is not sharded",
                           self.accelerator.distributed_type)
        if self.args.early_stopping_patience is not None:
            self.add_callback(EarlyStoppingCallback(self.args.early_stopping_patience,
                                                    self.args.early_stopping_threshold))
        if self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0:
            logger.warning("dataloader_persistent_workers: the workers keep the collator of the first epoch, so its "
                           "augmentation repeats every epoch and a resumed run draws other augmentation")
        # cache_encoder_outputs: media key -> per-utterance (audio tokens, mask, video tokens, mask) on the device.
        self._media_cache = {}
        if args.cache_encoder_outputs:
            self._check_cacheable()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if args.use_liger_kernel:
            apply_liger_kernel_to_text_model(unwrapped, **(args.liger_kernel_config or {}))
        if args.compile_decoder_layers or args.compile_encoder_layers:
            unwrapped.compile_layers(decoder=args.compile_decoder_layers, encoders=args.compile_encoder_layers,
                                     mode=args.compile_mode)

    def _warn_half_precision_padding(self):
        if self.args.pad_to_multiple_of is None or self.model is None:
            return
        weights = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if weights is not None:
            message = half_precision_padding_warning(weights.dtype, self.args.device.type, self.args.pad_to_multiple_of)
            if message:
                logger.warning(message)

    def _check_processor(self):
        """The processor places the placeholders with its own rates; they must be the model's (the training forward
        on an accelerator does not re-count them, see `get_placeholder_mask`)."""
        processor, config = self.processing_class, getattr(self.model, "config", None)
        names = ["modality", "audio_compression_rate", "video_compression_rate", "partial_window"]
        if getattr(processor, "video_output", None) == "uint8":
            names += ["video_mean", "video_std"]
        if processor is None or config is None or not all(hasattr(processor, n) for n in names):
            return
        wrong = {n: (getattr(processor, n), getattr(config, n)) for n in names
                 if getattr(processor, n) != getattr(config, n, getattr(processor, n))}
        if wrong:
            raise ValueError("The processor does not match the model (processor value, model value): "
                             + ", ".join(f"{n} {v}" for n, v in wrong.items()))

    def _check_cacheable(self):
        model = self.accelerator.unwrap_model(self.model)
        trainable = [type(e).__name__ for e in model.model.encoders() if any(p.requires_grad for p in e.parameters())]
        if trainable:
            raise ValueError(f"cache_encoder_outputs needs frozen encoders; {trainable} train")
        augments = getattr(self.data_collator, "augments", None)
        if augments:
            raise ValueError("cache_encoder_outputs needs a training collator without augmentation (noise, random "
                             "crops, time masking): the cache would repeat each utterance's first draw")
        if augments is None:
            logger.warning("cache_encoder_outputs: the training collator does not say whether it augments (no "
                           "`augments` attribute); the cache assumes that it does not.")

    # ---- loss ----------------------------------------------------------------------------------------------------

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # The same decision training_step takes: if True, it will not divide our returned loss by the GA steps.
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.compile_decoder_layers or self.args.compile_encoder_layers:
            # CUDA-graph trees: the previous step's graph outputs are no longer needed (no-op without graphs).
            torch.compiler.cudagraph_mark_step_begin()
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weight = self.args.decorrelation_weight
        training = model.training
        media_keys = inputs.pop("media_keys", None)
        if media_keys is not None and training:
            inputs = self._with_cached_media(inputs, media_keys)
        measure = weight > 0 or not training  # free in evaluation: no backward, hidden states are kept anyway
        if measure:
            inputs = {**inputs, "output_hidden_states": True}
        # Trainer's own loss: the CE normalised by num_items_in_batch (the whole accumulation window, all processes)
        # and multiplied by the number of processes, since DDP averages gradients.
        repeated = None
        if not training:
            # Evaluation has no gradients to average: each batch's CE is its own token mean, as on one process.
            # (Trainer's prediction_step passes the token count gathered over the processes, which makes the loss
            # depend on the other processes' batches, and on the repeated rows that pad an odd test split.)
            num_items_in_batch = None
            repeated = self._repeated_rows(inputs["input_ids"])
            if repeated is not None and inputs.get("labels") is not None:
                inputs = {**inputs, "labels": inputs["labels"].masked_fill(repeated.unsqueeze(-1), IGNORE_INDEX)}
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = ce
        phase = "train" if training else "eval"
        logged = {}
        if training:
            ga_steps = self.current_gradient_accumulation_steps
            scaled = self._loss_is_scaled_for_ga(num_items_in_batch)
            # Logged per micro-batch so that a window's contributions add up to that optimizer step's mean.
            logged["ce_loss"] = ce.detach() if scaled else ce.detach() / ga_steps
            step_fraction = 1.0 / ga_steps
        else:
            logged["ce_loss"] = ce.detach()
            step_fraction = 1.0
        if measure:
            attention_mask = inputs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(inputs["input_ids"])
            if repeated is not None:  # a sample without attended tokens does not count in the mean
                attention_mask = attention_mask.masked_fill(repeated.unsqueeze(-1), 0)
            token_mask = None
            if self.args.decorrelation_tokens == "prefix":
                token_mask = prefix_mask(attention_mask, inputs.get("labels"))
            decor = decorrelation_loss(
                outputs.hidden_states, attention_mask, token_mask, layers=self.args.decorrelation_layers
            )
            # A per-micro-batch mean, like the paper's loss. When the CE is normalised over the accumulation window
            # training_step does not divide by the GA steps, so we do; it is not multiplied by the number of
            # processes: DDP's gradient average already makes it the mean over processes.
            if training and scaled:
                decor_term = decor / ga_steps
            else:
                decor_term = decor
            if weight > 0:
                loss = loss + weight * decor_term
            # Logged per micro-batch like the CE, so that a window's contributions add up to the step's mean whether
            # or not training_step divides the loss by the GA steps afterwards.
            logged["decor_loss"] = decor.detach() / ga_steps if training else decor.detach()
        self._accumulate(phase, logged, step_fraction)
        return (loss, outputs) if return_outputs else loss

    def _with_cached_media(self, inputs, keys):
        """The batch with its media replaced by `media_tokens`: from the cache if every utterance is in it, else
        encoded now, and the utterances stored (no host read either way: padded rows are kept as they are)."""
        media = {k: inputs[k] for k in MEDIA_KEYS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in MEDIA_KEYS}
        fields = ("audio_tokens", "audio_mask", "video_tokens", "video_mask")
        if all(key in self._media_cache for key in keys):
            rows = [self._media_cache[key] for key in keys]
            encoded = {name: None if rows[0][i] is None else pad_sequence([row[i] for row in rows], batch_first=True)
                       for i, name in enumerate(fields)}
            inputs["media_tokens"] = LlamaAVSRMediaTokens(**encoded)
            return inputs
        with torch.no_grad():
            tokens = self.accelerator.unwrap_model(self.model).encode_media(**media)
        for b, key in enumerate(keys):
            self._media_cache[key] = tuple(None if getattr(tokens, f) is None else getattr(tokens, f)[b]
                                           for f in fields)
        inputs["media_tokens"] = tokens
        return inputs

    def _repeated_rows(self, input_ids) -> torch.Tensor | None:
        """(B,) bool, or None: the rows of this process's last evaluation batch that accelerate repeats so that every
        process gets a full batch when the split does not divide evenly. gather_for_metrics keeps the first
        `remainder` rows of the last step (process 0's rows first), so the others' predictions and losses are
        dropped; their tokens must not enter the means of this batch's real rows either. A process whose rows are
        all repeats gets a NaN CE, dropped with them."""
        state = self.accelerator.gradient_state
        if not (state.end_of_dataloader and state.remainder > 0 and self.accelerator.even_batches):
            return None
        rows = input_ids.shape[0]
        first = self.accelerator.process_index * rows
        return torch.arange(first, first + rows, device=input_ids.device) >= state.remainder

    def _accumulate(self, phase, values, count):
        if phase == "eval":
            # As Trainer treats the eval loss: the batch's value once per row of a full batch, gathered from every
            # process with gather_for_metrics, which drops the rows that the last batches repeat to give each
            # process as many (an odd test split over 2 processes). Then the CE and decorrelation are means over
            # the utterances, each counted once, and eval_loss = eval_ce_loss + lambda * eval_decor_loss.
            names = sorted(values)
            per_row = torch.stack([values[name].float().reshape(()) for name in names])
            rows = self.gather_function(per_row.unsqueeze(0).repeat(self.args.eval_batch_size, 1))
            values, count = dict(zip(names, rows.sum(0))), rows.shape[0]
        sums = self._aux_sums[phase]
        for name, value in values.items():
            sums[name] = sums[name] + value if name in sums else value
        self._aux_counts[phase] += count

    def _reduce_aux(self, phase) -> dict[str, float]:
        """Mean over the steps (train, averaged over processes) or the evaluated utterances (eval, already gathered)
        since the last reduction; resets. Every process must call it (it gathers)."""
        sums, count = self._aux_sums[phase], self._aux_counts[phase]
        self._aux_sums[phase], self._aux_counts[phase] = {}, 0.0
        if not sums or count == 0:
            return {}
        names = sorted(sums)
        stacked = torch.stack([sums[name].float().reshape(()) for name in names]).to(self.args.device)
        if phase == "train":
            stacked = self.accelerator.gather(stacked.unsqueeze(0)).mean(0)
        return {name: value / count for name, value in zip(names, stacked.tolist())}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs (the ones with "loss") get the CE and decorrelation parts of that same loss.
        if "loss" in logs:
            logs = {**logs, **self._reduce_aux("train")}
        super().log(logs, start_time)
        if "loss" in logs:
            self._check_finite(logs)

    def _check_finite(self, logs):
        """Stop at the first log whose loss parts or gradient norm are NaN or infinite. Trainer's
        `logging_nan_inf_filter` hides such steps from `loss`, and one NaN gradient makes every weight NaN through
        the optimizer, so without this a run goes on to its last epoch and reports 100 % WER. The values are already
        on the host (nothing is synchronised for this). Under fp16 autocast the GradScaler skips inf steps by design,
        so only its losses are checked."""
        names = ["ce_loss", "decor_loss"] + ([] if self.args.fp16 else ["grad_norm"])
        bad = {n: logs[n] for n in names if n in logs and isinstance(logs[n], (int, float)) and not np.isfinite(logs[n])}
        if bad:
            dtype = next(self.model.parameters()).dtype
            raise FloatingPointError(
                f"training diverged by step {self.state.global_step}: "
                + ", ".join(f"{n} = {v}" for n, v in bad.items())
                + f" (weights in {str(dtype).removeprefix('torch.')}, learning rate {logs.get('learning_rate')}). "
                "Stopped before anything more is saved; with bfloat16 or float16 weights, retry with --dtype float32")

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """checkpoint-N: a light checkpoint (see the module docstring); anything else (save_model): every weight.
        Sharded models (DeepSpeed, FSDP) keep Trainer's own saving."""
        if not (self._saving_checkpoint and self.args.light_checkpoints) or self.is_deepspeed_enabled \
                or self.is_fsdp_enabled:
            return super()._save(output_dir, state_dict)
        from modeling_llama_avsr.hub import save_light_checkpoint

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_light_checkpoint(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir,
                              require_base=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not _is_light_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from modeling_llama_avsr.modeling_llama_avsr import load_light_weights

        logger.info("Loading the trained tensors of %s", resume_from_checkpoint)
        load_light_weights(self.accelerator.unwrap_model(model if model is not None else self.model),
                           resume_from_checkpoint)

    def _load_best_model(self):
        if not _is_light_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        from modeling_llama_avsr.modeling_llama_avsr import load_light_weights

        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_light_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    # ---- several processes ---------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        if self.is_fsdp_enabled:
            check_fsdp_ignored_modules(self.model, self.accelerator.state.fsdp_plugin.ignored_modules)
        return super().train(*args, **kwargs)

    # ---- batching ------------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:  # its global-RNG order would not survive a resumption
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed=seed)
        return sampler

    def get_train_dataloader(self):
        """Fixed batch sizes (Trainer's own), or batches filled up to `max_frames_per_batch` video frames."""
        if self.args.max_frames_per_batch is None:
            return super().get_train_dataloader()
        from modeling_llama_avsr.data.sampler import MaxFramesBatchSampler

        sampler = MaxFramesBatchSampler(
            self.train_dataset["num_frames"], self.args.max_frames_per_batch, num_replicas=self.args.world_size,
            seed=self.args.seed, drop_last=self.args.dataloader_drop_last,
        )
        self._max_frames_sampler = sampler
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator, num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
        )
        return self.accelerator.prepare(loader)  # accelerate deals the batches out to the processes

    # ---- evaluation ----------------------------------------------------------------------------------------------

    def _prepare_eval_collator(self, collator):
        return LogitsToKeepCollator(collator)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._aux_sums["eval"], self._aux_counts["eval"] = {}, 0.0
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        for name, value in self._reduce_aux("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Teacher-forced loss (if the batch has labels), then the generated transcript tokens as "predictions".

        Only the new tokens come back, never logits or hidden states, so nothing large is gathered."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        if labels is not None and not prediction_loss_only and any(k in inputs for k in MEDIA_KEYS):
            # The loss and generate() see the same media: encode them once for both.
            media = {k: inputs.pop(k) for k in MEDIA_KEYS if k in inputs}
            with torch.no_grad():
                inputs["media_tokens"] = self.accelerator.unwrap_model(model).encode_media(**media)
        loss = None
        if labels is not None:
            loss, _, _ = super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)
        if prediction_loss_only:
            return loss, None, None
        pad_token_id = self._pad_token_id()
        if labels is not None:
            generation_inputs = prompt_only(inputs, pad_token_id)
        else:
            generation_inputs = {k: v for k, v in inputs.items() if k not in TEACHER_FORCING_KEYS}
        with torch.no_grad():
            generated = self.accelerator.unwrap_model(model).generate(
                **generation_inputs,
                num_beams=self.args.generation_num_beams,
                max_new_tokens=self.args.generation_max_new_tokens,
                do_sample=False,  # a WER must not change from run to run (the original sampled)
                pad_token_id=pad_token_id,
            )
        new_tokens = generated[:, generation_inputs["input_ids"].shape[1] :]
        return loss, new_tokens, labels

    def _pad_token_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.model.generation_config.pad_token_id
        if pad is None:
            raise ValueError("No pad token id: pass the LlamaAVSRProcessor as processing_class")
        return pad

    def _word_error_rate(self, eval_prediction) -> dict[str, float]:
        # Trainer pads predictions and labels across batches and processes with -100.
        pad_token_id = self._pad_token_id()
        predictions = np.where(eval_prediction.predictions == IGNORE_INDEX, pad_token_id, eval_prediction.predictions)
        references = np.where(eval_prediction.label_ids == IGNORE_INDEX, pad_token_id, eval_prediction.label_ids)
        decode = self.processing_class.batch_decode
        return {"wer": word_error_rate(decode(predictions, skip_special_tokens=True),
                                       decode(references, skip_special_tokens=True))}


__all__ = ["AVSRTrainer", "EpochSeededLengthGroupedSampler", "EvalCollatorTrainer", "apply_liger_kernel_to_text_model",
           "check_fsdp_ignored_modules", "prompt_only"]
