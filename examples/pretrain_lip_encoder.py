"""Pretrain a small AV-HuBERT lip encoder on the synthetic corpus, as a stand-in for released AV-HuBERT weights.

Llama-AVSR uses a *pretrained, frozen* AV-HuBERT: its lip features already separate what the lips show. No
lip-reading weights exist offline, and a lip encoder trained from scratch through the LLM's loss learns too little in
a CPU budget to help (RESULTS.md). AV-HuBERT is pretrained by predicting one label per 25 Hz frame (cluster ids of
its own features); here the label is the viseme the synthetic speaker's mouth shows at that frame, taken from the
corpus's phoneme timings. The result is an ordinary `AVHubertModel` folder for `run_avsr.py --video_encoder`:

    python examples/pretrain_lip_encoder.py                                   # -> outputs/lip_encoder/final
    python examples/run_avsr.py --modality avsr --video_encoder outputs/lip_encoder/final

The frames go through the same `LlamaAVSRProcessor` (crop, normalisation) that feeds the encoder inside Llama-AVSR,
with the training collator's random crop and time masking. It prints frame accuracy on the validation split.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser, TrainingArguments, set_seed

from modeling_llama_avsr import LlamaAVSRProcessor
from modeling_llama_avsr.data import load_synthetic, make_corpus
from modeling_llama_avsr.data.collator import random_crop, time_mask_video
from modeling_llama_avsr.data.loading import read_video
from modeling_llama_avsr.data.mouth import FPS, VISEMES
from modeling_llama_avsr.modeling_avhubert import AVHubertForFrameClassification
from trainer import EvalCollatorTrainer
from run_avsr import small_video_encoder  # the encoder shape of the offline default (examples/ is on sys.path)


@dataclass
class LipArguments:
    data_dir: str = field(default="outputs/synthetic_corpus", metadata={"help": "Synthetic corpus (made if absent)."})
    text_model: str = field(default="smollm2-135m", metadata={"help": "Only for the processor's tokenizer."})
    num_train: int = 1200
    num_validation: int = 50
    num_test: int = 200
    corpus_workers: int = 2
    corpus_seed: int = 0


def frame_visemes(record: dict, num_frames: int) -> np.ndarray:
    """Viseme class index shown at each video frame: frame f shows time (f + 0.5) / fps (mouth.py); "sil" outside
    the phonemes."""
    labels = np.full(num_frames, VISEMES.index("sil"), dtype=np.int64)
    times = (np.arange(num_frames) + 0.5) / record.get("fps", FPS)
    for viseme, start, end in record["visemes"]:
        labels[(times >= start) & (times < end)] = VISEMES.index(viseme)
    return labels


@dataclass
class VisemeCollator:
    """Rows of the synthetic corpus -> pixel_values_videos, attention_mask and per-frame viseme labels."""

    processor: LlamaAVSRProcessor
    train: bool = False
    seed: int = 0

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)

    def __call__(self, rows):
        size = self.processor.video_crop_size
        videos, labels = [], []
        for row in rows:
            video = read_video(row["video_path"], min_size=size)
            record = json.loads(Path(row["video_path"]).with_suffix(".json").read_text())
            labels.append(torch.from_numpy(frame_visemes(record, len(video))))
            if self.train:
                video = time_mask_video(random_crop(video, size, self._rng), self._rng)
            videos.append(video)
        batch = self.processor(videos=videos)
        mask = batch["video_attention_mask"]
        padded = torch.full(mask.shape, -100, dtype=torch.long)
        for i, clip in enumerate(labels):
            padded[i, : len(clip)] = clip
        return {"pixel_values_videos": batch["pixel_values_videos"][:, None], "attention_mask": mask, "labels": padded}


def frame_accuracy(eval_prediction):
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    keep = labels != -100
    return {"frame_accuracy": float((predictions[keep] == labels[keep]).mean())}


def parse_args(argv):
    parser = HfArgumentParser((LipArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="outputs/lip_encoder", per_device_train_batch_size=16, per_device_eval_batch_size=16,
        learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=20, weight_decay=0.01, num_train_epochs=4,
        logging_steps=10, eval_strategy="epoch", save_strategy="no", report_to="none",
        train_sampling_strategy="group_by_length", length_column_name="duration", dataloader_num_workers=0,
        remove_unused_columns=False, seed=0, use_cpu=not torch.cuda.is_available(),
    )
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv=None):
    args, training_args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    corpus = make_corpus(args.data_dir, num_train=args.num_train, num_validation=args.num_validation,
                         num_test=args.num_test, seed=args.corpus_seed, num_workers=args.corpus_workers)
    train_set, validation_set = load_synthetic(corpus, "train"), load_synthetic(corpus, "validation")

    config = small_video_encoder()
    config.id2label = dict(enumerate(VISEMES))
    config.label2id = {v: i for i, v in enumerate(VISEMES)}
    model = AVHubertForFrameClassification(config)
    processor = LlamaAVSRProcessor.from_components(text_model=args.text_model, modality="vsr")
    trainer = EvalCollatorTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=validation_set,
        data_collator=VisemeCollator(processor, train=True, seed=training_args.seed),
        compute_metrics=frame_accuracy,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
        eval_data_collator=VisemeCollator(processor),  # no random crop or time masking
    )
    trainer.train()
    metrics = trainer.evaluate()

    final_dir = Path(training_args.output_dir) / "final"
    if trainer.is_world_process_zero():
        trainer.model.avhubert.save_pretrained(final_dir)  # a plain AVHubertModel: the head stays behind
        (final_dir / "pretraining.json").write_text(json.dumps({
            "objective": "per-frame viseme classification on the synthetic corpus",
            "corpus": str(corpus), "validation_frame_accuracy": metrics["eval_frame_accuracy"],
            "chance": float(1 / len(VISEMES)), "epochs": training_args.num_train_epochs,
        }, indent=2))
    trainer.accelerator.end_training()
    print(f"validation frame accuracy {100 * metrics['eval_frame_accuracy']:.1f}% "
          f"({len(VISEMES)} visemes); lip encoder saved to {final_dir}")
    return metrics


if __name__ == "__main__":
    main()
