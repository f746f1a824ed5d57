"""Where the main job's time goes, measured in one run: training step and generation in fp32 vs bf16 autocast, and
the Whisper encoder on the full 30-s window vs the trimmed window. Prints medians and ratios.

    python examples/benchmarks/bench_cpu_step.py [--corpus outputs/synthetic_corpus] [--repeats 5]

Uses the real offline weights (SmolLM2-135M + Whisper tiny.en, ASR, untrained projector) and real corpus clips.
"""

import argparse
import statistics
import time

import torch

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.data import load_synthetic
from modeling_llama_avsr.data.collator import AVSRDataCollator
from trainer.avsr_trainer import LogitsToKeepCollator, prompt_only


def median_seconds(fn, repeats):
    fn()  # warm-up: allocator, one-time kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="outputs/synthetic_corpus")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    parts = dict(text_model="smollm2-135m", audio_encoder="whisper-tiny.en", modality="asr")
    model = LlamaAVSRForConditionalGeneration.from_components(**parts)
    rows = [load_synthetic(args.corpus, "train")[i] for i in range(args.batch_size)]
    results = {}
    for window in ("trimmed", "full"):
        processor = LlamaAVSRProcessor.from_components(**parts, audio_window=window)
        batch = LogitsToKeepCollator(AVSRDataCollator(processor))(rows)
        generation_inputs = prompt_only(batch, processor.tokenizer.pad_token_id)

        def encode():
            with torch.no_grad():
                model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])

        results[f"whisper encoder, {window} window"] = median_seconds(encode, args.repeats)
        if window != "trimmed":
            continue
        for precision in ("fp32", "bf16 autocast"):
            autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision != "fp32")

            def step():
                model.train()
                with torch.autocast(**autocast):
                    loss = model(**batch).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            def generate():
                model.eval()
                with torch.no_grad(), torch.autocast(**autocast):
                    model.generate(**generation_inputs, max_new_tokens=12, min_new_tokens=12)

            results[f"training step, {precision}"] = median_seconds(step, args.repeats)
            results[f"generate 12 tokens, {precision}"] = median_seconds(generate, args.repeats)

    print(f"\nbatch of {args.batch_size} corpus clips, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"  {name:<34} {seconds:7.3f} s")
    r = results
    print(f"  bf16 autocast / fp32, training step   {r['training step, bf16 autocast'] / r['training step, fp32']:.2f}x")
    print(f"  bf16 autocast / fp32, generation      "
          f"{r['generate 12 tokens, bf16 autocast'] / r['generate 12 tokens, fp32']:.2f}x")
    print(f"  full / trimmed window, Whisper        "
          f"{r['whisper encoder, full window'] / r['whisper encoder, trimmed window']:.2f}x")


if __name__ == "__main__":
    main()
