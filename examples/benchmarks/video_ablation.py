"""Does a trained AVSR model use the video? Evaluate it on the test split with each clip's own video and with the
video of another test clip (the next one in the split), the audio unchanged.

    python examples/benchmarks/video_ablation.py --model outputs/avsr_babble3/final --eval_noise babble --eval_snr_db 0

The noisy audio is the one run_avsr.py evaluates on (noise seeded per utterance, babble drawn from the training
split), so the "own video" row reproduces run_avsr.py's number and the two rows differ only in the video.
"""

import argparse
import tempfile

import torch

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.data import load_synthetic
from modeling_llama_avsr.data.collator import AVSRDataCollator, NoiseSpec
from trainer import AVSRTrainer, AVSRTrainingArguments


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved AVSR (or VSR) model folder")
    parser.add_argument("--data_dir", default="outputs/synthetic_corpus")
    parser.add_argument("--eval_noise", default="none", choices=["none", "babble", "white"])
    parser.add_argument("--eval_snr_db", type=float, default=0.0)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()

    model = LlamaAVSRForConditionalGeneration.from_pretrained(args.model)
    processor = LlamaAVSRProcessor.from_pretrained(args.model)
    if not processor.uses_video:
        parser.error(f"{args.model} is an {processor.modality.upper()} model: it has no video to swap")
    train_set, test_set = load_synthetic(args.data_dir, "train"), load_synthetic(args.data_dir, "test")
    videos = test_set["video_path"]
    swapped = test_set.remove_columns("video_path").add_column("video_path", videos[1:] + videos[:1])

    noise = None if args.eval_noise == "none" else NoiseSpec(args.eval_noise, (args.eval_snr_db,))
    collator = AVSRDataCollator(processor, eval_noise=noise, babble_pool=list(train_set["audio_path"]))
    with tempfile.TemporaryDirectory() as output_dir:
        # Batches grouped by duration as in run_avsr.py (Trainer groups evaluation batches too), so that the
        # "own video" row reproduces its number exactly: the batch mix shifts corpus CE and greedy ties slightly.
        training_args = AVSRTrainingArguments(
            output_dir=output_dir, per_device_eval_batch_size=args.batch_size, report_to="none", seed=0,
            train_sampling_strategy="group_by_length", length_column_name="duration",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = AVSRTrainer(model=model, args=training_args, eval_data_collator=collator,
                              processing_class=processor)
        rows = {name: trainer.evaluate(data, metric_key_prefix="test")
                for name, data in (("own video", test_set), ("another clip's video", swapped))}

    condition = "clean" if noise is None else f"{args.eval_noise} {args.eval_snr_db:g} dB"
    print(f"\n{args.model}: {len(test_set)} test utterances, audio {condition}")
    for name, metrics in rows.items():
        print(f"{name:<22}: WER {100 * metrics['test_wer']:.2f}%  CE {metrics['test_ce_loss']:.4f}")


if __name__ == "__main__":
    main()
