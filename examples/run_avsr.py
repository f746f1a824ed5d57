"""Fine-tune Llama-AVSR (optionally with the decorrelation loss) and report WER.

With no arguments it runs the embedded default end to end, offline, on a CPU: make (or reuse) the synthetic
audio-visual corpus, compose SmolLM2-135M + Whisper tiny.en into an ASR model, LoRA fine-tune, decode the test split,
save model + processor, print a summary. Every flag of the three dataclasses below (and of TrainingArguments) can be
given on the command line, or all of them in one JSON/YAML file: `python examples/run_avsr.py config.json`.

    python examples/run_avsr.py                                    # ASR, lambda = 0
    python examples/run_avsr.py --decorrelation_weight 100         # with the paper's decorrelation loss
    python examples/pretrain_lip_encoder.py                        # offline stand-in for AV-HuBERT weights
    python examples/run_avsr.py --modality avsr --video_encoder outputs/lip_encoder/final \
        --train_noise babble --eval_noise babble --eval_snr_db 0
    python examples/run_avsr.py --dataset lrs3 --data_dir /data/lrs3 --train_split trainval --max_duration 16 \
        --text_model meta-llama/Llama-3.2-3B --audio_encoder openai/whisper-medium.en --video_encoder DIR
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, set_seed

from modeling_llama_avsr import AVHubertConfig, LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.data import load_lrs, load_synthetic, make_corpus
from modeling_llama_avsr.data.collator import AVSRDataCollator, NoiseSpec
from modeling_llama_avsr.hub import save_light_checkpoint
from trainer import AVSRTrainer, AVSRTrainingArguments

logger = logging.getLogger("run_avsr")


@dataclass
class ModelArguments:
    """How the model is composed (ignored with --model_name_or_path, which loads a saved one)."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved LlamaAVSR folder (full or light) to continue from, instead of "
                                        "composing one from the parts below."})
    text_model: str = field(default="smollm2-135m", metadata={"help": "Causal LM: Hub id, folder or offline name."})
    audio_encoder: str = field(default="whisper-tiny.en", metadata={"help": "Whisper: Hub id, folder, offline name."})
    video_encoder: str | None = field(
        default=None,
        metadata={"help": "AV-HuBERT folder, loaded frozen (offline: examples/pretrain_lip_encoder.py makes one); "
                          "default: a small random encoder, trained with the rest."},
    )
    modality: str = field(default="asr", metadata={"help": "Streams that feed the LLM: audio, video or both.",
                                                   "choices": ["asr", "vsr", "avsr"]})
    compression_type: str = field(default="avg", metadata={
        "help": "Encoder frames per LLM token: averaged ('avg', the sink paper) or concatenated ('stack').",
        "choices": ["avg", "stack"]})
    audio_compression_rate: int = field(default=4, metadata={"help": "Whisper frames (20 ms) per audio token."})
    video_compression_rate: int = field(default=2, metadata={"help": "Lip frames (40 ms) per video token."})
    projector_hidden_size: int = field(default=2048, metadata={"help": "Hidden width of the Linear-ReLU-Linear "
                                                                       "projectors."})
    projector_layer_norm: bool = field(default=False, metadata={"help": "LayerNorm after each projector (used with "
                                                                        "the decorrelation loss)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank on the LLM's q/v projections (0: no LoRA)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling alpha / rank)."})
    audio_window: str = field(
        default="trimmed", metadata={"help": "Log-mel window: 'full' 30-s Whisper windows, or 'trimmed' to the "
                                             "batch's longest clip (same frames, faster).",
                                     "choices": ["full", "trimmed"]}
    )
    final_save: str = field(default="both", metadata={
        "help": "Checkpoints written after training: 'full' (every weight, final/), 'light' (what training changed, "
                "final-light/), 'both', or 'none' (many short runs, e.g. examples/reproduce_paper.py).",
        "choices": ["both", "full", "light", "none"]})
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype: 'auto' is float32 (bfloat16 weights diverged to NaN within 10 steps of "
                          "this recipe on an H200; see RESULTS.md), or bfloat16 / float16 on request.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )


def weights_dtype(name: str) -> torch.dtype:
    # float32 on every device: the main job's recipe in bfloat16 weights (LoRA and projectors trained in bfloat16 too)
    # gave NaN gradients by step 10 on the H200, while the same recipe in float32 trains there as on the CPU.
    return torch.float32 if name == "auto" else getattr(torch, name)


@dataclass
class DataArguments:
    """What to train and test on, and the noise conditions."""

    _argument_group_name = "data"

    dataset: str = field(default="synthetic", metadata={"help": "The synthetic corpus (made offline if absent) or "
                                                                "LRS2/LRS3 (licensed; see load_lrs).",
                                                        "choices": ["synthetic", "lrs2", "lrs3"]})
    data_dir: str = field(
        default="outputs/synthetic_corpus",
        metadata={"help": "Synthetic corpus (made if absent), or the LRS2/LRS3 root (see load_lrs)."},
    )
    train_split: str = field(default="train", metadata={"help": "LRS split to train on (e.g. trainval, pretrain)."})
    test_split: str = field(default="test", metadata={"help": "LRS split decoded for the final WER."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Split evaluated during training (--eval_strategy steps|epoch, --load_best_model_at_end, "
                          "--early_stopping_patience). Default: 'validation' for the synthetic corpus, none for LRS "
                          "(LRS2: val; LRS3 has none, hold out part of trainval in a csv)."},
    )
    max_duration: float | None = field(default=None, metadata={"help": "Drop longer LRS clips (seconds)."})
    num_train: int = field(default=1200, metadata={"help": "Synthetic corpus: training utterances."})
    num_validation: int = field(default=50, metadata={"help": "Synthetic corpus: validation utterances."})
    num_test: int = field(default=200, metadata={"help": "Synthetic corpus: test utterances."})
    corpus_workers: int = field(default=2, metadata={"help": "Synthetic corpus: processes synthesising it."})
    corpus_seed: int = field(default=0, metadata={"help": "Synthetic corpus: seed of its sentences and voices."})
    overwrite_corpus: bool = field(default=False, metadata={"help": "Rebuild a corpus made with other parameters."})
    train_noise: str = field(default="none", metadata={
        "help": "Noise added in training, at an SNR drawn per utterance from -5..20 dB or clean.",
        "choices": ["none", "babble", "white"]})
    eval_noise: str = field(default="none", metadata={
        "help": "A second test condition with this noise at --eval_snr_db (the clean one is always run).",
        "choices": ["none", "babble", "white"]})
    eval_snr_db: float = field(default=0.0, metadata={"help": "SNR of the --eval_noise test condition (dB)."})
    audio_time_mask: bool = field(
        default=False, metadata={"help": "Zero up to 0.4 s of every second of training audio, as the reference does."}
    )
    final_validation: bool = field(default=False, metadata={
        "help": "After training, also decode the validation split (clean): its WER and CE go into the summary as "
                "`final_validation`, e.g. to choose lambda on it as the paper does."})


def small_video_encoder() -> AVHubertConfig:
    """A small AV-HuBERT for the offline default: no lip-reading weights exist offline, so it trains from scratch and
    must fit a 2-core CPU (the Large front-end alone would cost about a second per utterance here)."""
    return AVHubertConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, conv_pos=32,
        conv_pos_groups=8, resnet_frontend_channels=16, resnet_channels=[16, 32, 64, 128], layerdrop=0.0,
    )


def build(model_args: ModelArguments):
    dtype = weights_dtype(model_args.dtype)
    if model_args.model_name_or_path:
        model = LlamaAVSRForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=dtype)
        processor = LlamaAVSRProcessor.from_pretrained(model_args.model_name_or_path)
        return model, processor
    video_encoder = model_args.video_encoder
    freeze_video = True
    if model_args.modality != "asr" and video_encoder is None:
        video_encoder, freeze_video = small_video_encoder(), False
    components = dict(
        text_model=model_args.text_model,
        audio_encoder=model_args.audio_encoder if model_args.modality != "vsr" else None,
        video_encoder=video_encoder if model_args.modality != "asr" else None,
        modality=model_args.modality,
    )
    settings = dict(
        compression_type=model_args.compression_type,
        audio_compression_rate=model_args.audio_compression_rate,
        video_compression_rate=model_args.video_compression_rate,
    )
    model = LlamaAVSRForConditionalGeneration.from_components(
        **components, **settings, projector_hidden_size=model_args.projector_hidden_size,
        projector_layer_norm=model_args.projector_layer_norm, lora_rank=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha, freeze_video_encoder=freeze_video, dtype=dtype,
    )
    # On a GPU, video travels as uint8 and is normalised there (to the same values): a quarter of the bytes.
    processor = LlamaAVSRProcessor.from_components(
        **components, **settings, audio_window=model_args.audio_window,
        video_output="uint8" if torch.cuda.is_available() else "normalized",
    )
    return model, processor


def noise(kind: str, snr_db) -> NoiseSpec | None:
    return None if kind == "none" else NoiseSpec(kind, tuple(snr_db))


def parse_args(argv):
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, AVSRTrainingArguments),
        usage="python examples/run_avsr.py [--FLAG VALUE ...] | CONFIG.json | CONFIG.yaml",
        description=__doc__.split("\n\n")[0] + " The model and data flags come first; the training flags are "
        "transformers' TrainingArguments (the defaults shown are this script's) plus the Llama-AVSR ones "
        "(decorrelation loss, light checkpoints, early stopping).",
    )
    defaults = dict(
        output_dir="outputs/run_avsr", per_device_train_batch_size=8, per_device_eval_batch_size=32,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=30, weight_decay=0.1, adam_beta2=0.98,
        max_grad_norm=10.0, num_train_epochs=3, logging_steps=10, eval_strategy="no", save_strategy="no",
        report_to="none", bf16=False, train_sampling_strategy="group_by_length", length_column_name="duration",
        seed=0, use_cpu=not torch.cuda.is_available(), metric_for_best_model="wer",
        # A GPU waits for the host otherwise: decode and process batches in worker processes, into pinned memory. Not
        # persistent: a persistent worker keeps the collator of the first epoch, whose augmentation would then repeat.
        dataloader_num_workers=min(4, os.cpu_count() or 1) if torch.cuda.is_available() else 0,
        dataloader_pin_memory=True,
    )
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0]).resolve()
        read = parser.parse_json_file if path.suffix == ".json" else parser.parse_yaml_file
        return read(str(path))
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None, study=None):
    """Run the script with `argv` (default: the command line). `study` (examples/reproduce_paper.py) is told about
    the run: `study.attach(trainer, context)` before training, `study.finish(trainer, context)` after the test
    decoding, `context` being a dict of the processor, the datasets and the evaluation collators."""
    model_args, data_args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    start = time.perf_counter()

    validation_split = data_args.validation_split or ("validation" if data_args.dataset == "synthetic" else None)
    if training_args.eval_strategy != "no" and validation_split is None:
        raise ValueError(f"--eval_strategy {training_args.eval_strategy.value} evaluates during training and needs "
                         f"--validation_split (the {data_args.dataset} split to evaluate on)")
    validation_set = None
    if data_args.dataset == "synthetic":
        corpus = make_corpus(
            data_args.data_dir, num_train=data_args.num_train, num_validation=data_args.num_validation,
            num_test=data_args.num_test, seed=data_args.corpus_seed, num_workers=data_args.corpus_workers,
            overwrite=data_args.overwrite_corpus,
        )
        train_set, test_set = load_synthetic(corpus, "train"), load_synthetic(corpus, "test")
        if training_args.eval_strategy != "no" or data_args.final_validation:
            validation_set = load_synthetic(corpus, validation_split)
    else:
        corpus = data_args.data_dir
        lrs = dict(dataset=data_args.dataset, max_duration=data_args.max_duration)
        train_set = load_lrs(corpus, split=data_args.train_split, **lrs)
        test_set = load_lrs(corpus, split=data_args.test_split, **lrs)
        if training_args.eval_strategy != "no" or data_args.final_validation:
            if validation_split is None:
                raise ValueError("--final_validation needs --validation_split (the split to decode)")
            validation_set = load_lrs(corpus, split=validation_split, **lrs)
    corpus_seconds = time.perf_counter() - start

    model, processor = build(model_args)
    # Saved with the processor: the pipeline cuts long recordings to what the model was trained on.
    seen = [*train_set["duration"], *(processor.training_clip_seconds or [])]
    processor.training_clip_seconds = [round(min(seen), 3), round(max(seen), 3)]
    babble = list(train_set["audio_path"])
    train_collator = AVSRDataCollator(
        processor, train=True, train_noise=noise(data_args.train_noise, (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, float("inf"))),
        babble_pool=babble, audio_time_mask=data_args.audio_time_mask, seed=training_args.seed,
    )
    clean_collator = AVSRDataCollator(processor, babble_pool=babble)
    trainer = AVSRTrainer(
        model=model, args=training_args, train_dataset=train_set,
        eval_dataset=validation_set if training_args.eval_strategy != "no" else None,
        data_collator=train_collator, eval_data_collator=clean_collator, processing_class=processor,
    )
    context = {"processor": processor, "train_set": train_set, "validation_set": validation_set, "test_set": test_set,
               "clean_collator": clean_collator, "noisy_collator": None}
    if study is not None:
        study.attach(trainer, context)
    train_start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - train_start

    final_validation = None
    if data_args.final_validation:
        final_validation = trainer.evaluate(validation_set, metric_key_prefix="validation")
    results = {"clean": trainer.evaluate(test_set, metric_key_prefix="test")}
    if data_args.eval_noise != "none":
        context["noisy_collator"] = trainer.eval_data_collator = AVSRDataCollator(
            processor, eval_noise=noise(data_args.eval_noise, (data_args.eval_snr_db,)), babble_pool=babble
        )
        context["noisy_condition"] = f"{data_args.eval_noise} {data_args.eval_snr_db:g} dB"
        results[context["noisy_condition"]] = trainer.evaluate(test_set, metric_key_prefix="test")
        trainer.eval_data_collator = clean_collator
    if study is not None:
        study.finish(trainer, context)

    final_dir = Path(training_args.output_dir) / "final"
    if model_args.final_save in ("both", "full"):
        trainer.save_model(final_dir)
    # Under torchrun every process gets here; one writes the processor and the summary, all leave the process
    # group cleanly (an undestroyed gloo/NCCL group can abort the interpreter at exit).
    trainer.accelerator.end_training()
    if not trainer.is_world_process_zero():
        return None
    if model_args.final_save in ("both", "full"):
        processor.save_pretrained(final_dir)
    else:
        final_dir = None
    # By default the final save keeps both kinds: every weight in final/, only what training changed in final-light/.
    light_dir = Path(training_args.output_dir) / "final-light"
    if model_args.final_save not in ("both", "light"):
        light_dir = None
    elif getattr(model.config, "base_components", None):
        save_light_checkpoint(trainer.model, light_dir)
        processor.save_pretrained(light_dir)
    else:
        logger.info("no light checkpoint: %s records no base components", model_args.model_name_or_path)
        light_dir = None
    summary = {
        "modality": model_args.modality,
        "compression": [model_args.compression_type, model_args.audio_compression_rate,
                        model_args.video_compression_rate],
        "decorrelation_weight": training_args.decorrelation_weight,
        "train_utterances": len(train_set), "test_utterances": len(test_set),
        "train_loss": train_result.training_loss,
        "test": {name: {k.removeprefix("test_"): v for k, v in r.items()} for name, r in results.items()},
        "seconds": {"corpus": round(corpus_seconds, 1), "train": round(train_seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "final_validation": None if final_validation is None else {
            k.removeprefix("validation_"): v for k, v in final_validation.items()},
        "saved_to": str(final_dir) if final_dir else None,
        "saved_light_to": str(light_dir) if light_dir else None,
        "validation": [log for log in trainer.state.log_history if "eval_wer" in log],
        "args": {"model": asdict(model_args), "data": asdict(data_args)},
    }
    (Path(training_args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    print("\n==== Llama-AVSR run summary ====")
    print(f"model      : {model_args.text_model} + {model_args.audio_encoder} ({model_args.modality.upper()}, "
          f"{model_args.compression_type} {model_args.audio_compression_rate}/{model_args.video_compression_rate}), "
          f"lambda = {training_args.decorrelation_weight:g}")
    print(f"data       : {len(train_set)} train / {len(test_set)} test {data_args.dataset} utterances ({corpus})")
    for name, r in results.items():
        print(f"test {name:<10}: WER {100 * r['test_wer']:.2f}%  CE {r['test_ce_loss']:.4f}  "
              f"decorrelation {r.get('test_decor_loss', float('nan')):.4f}")
    print(f"time       : corpus {corpus_seconds:.0f} s, training {train_seconds:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s ({torch.get_num_threads()} threads)")
    if final_validation is not None:
        print(f"validation : WER {100 * final_validation['validation_wer']:.2f}%  "
              f"CE {final_validation['validation_ce_loss']:.4f}")
    print(f"saved      : {final_dir or '-'} (full), {light_dir or '-'} (light)")
    return summary


if __name__ == "__main__":
    main()
