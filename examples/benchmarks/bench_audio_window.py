"""Batch-invariant audio encoding, two ways: mask the padding of the trimmed window, or pad each clip to a length
bucket of its own (unmasked, one encoder call per bucket). Speed on the CPU, and WER of a trained model on the
corpus' test split against the full 30-s window.

    python examples/benchmarks/bench_audio_window.py --model outputs/run_avsr/final [--corpus outputs/synthetic_corpus]

Speed: log-mel + Whisper encoder per batch of 8 test clips, in random order (as a user's files come) and sorted by
length (as length-grouped training batches are); median over all batches of `--repeats` passes. WER: greedy
decoding of the test split with each encoding. Without --model only the speed is measured.
"""

import argparse
import contextlib
import logging
import statistics
import time

import numpy as np
import torch

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.configuration_llama_avsr import whisper_trimmed_frames
from modeling_llama_avsr.data import load_synthetic, read_audio
from trainer.metrics import word_error_rate

HOP = 160
FULL_WINDOW = 480_000  # samples: Whisper's 30 s


@contextlib.contextmanager
def unmasked(encoder):
    """The encoder attends every frame it is given (as Whisper is pretrained), whatever the window."""
    forward = encoder.forward
    encoder.forward = lambda input_features, attention_mask=None, **kw: forward(input_features, None, **kw)
    try:
        yield
    finally:
        encoder.forward = forward


def features(extractor, clips, window):
    return extractor(clips, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                     max_length=window, return_tensors="pt")


def bucket_window(length: int, bucket_s: float) -> int:
    bucket = int(bucket_s * 16000)
    return min(FULL_WINDOW, -(-(length + HOP) // bucket) * bucket)


def encode(model, extractor, clips, how):
    """Encoder outputs of one batch: "full", "masked" (trimmed to the batch, padding masked) or ("bucket", s)."""
    encoder = model.model.audio_encoder
    with torch.no_grad():
        if how == "full":
            f = features(extractor, clips, FULL_WINDOW)
            return encoder(f["input_features"]).last_hidden_state
        if how == "masked":
            window = whisper_trimmed_frames(-(-max(len(c) for c in clips) // HOP)) * HOP  # as the processor pads
            f = features(extractor, clips, window)
            return encoder(f["input_features"], attention_mask=f["attention_mask"]).last_hidden_state
        groups = {}
        for i, clip in enumerate(clips):
            groups.setdefault(bucket_window(len(clip), how[1]), []).append(i)
        outputs = {}
        for window, members in groups.items():
            f = features(extractor, [clips[i] for i in members], window)
            for i, out in zip(members, encoder(f["input_features"]).last_hidden_state):
                outputs[i] = out
        return [outputs[i] for i in range(len(clips))]


def speed(model, extractor, clips, how, batch_size, repeats):
    times = []
    for _ in range(repeats):
        for start in range(0, len(clips), batch_size):
            begin = time.perf_counter()
            encode(model, extractor, clips[start : start + batch_size], how)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def transcribe(model, processor, clips, how, batch_size):
    """Greedy transcripts with the audio encoded `how` (the rest of the batch as the processor builds it)."""
    texts = []
    encoder = model.model.audio_encoder
    for start in range(0, len(clips), batch_size):
        batch_clips = clips[start : start + batch_size]
        batch = processor(audio=batch_clips)  # trimmed: token counts depend on real frames only
        if how == "full":
            f = features(processor.feature_extractor, batch_clips, FULL_WINDOW)
            batch["input_features"], batch["feature_attention_mask"] = f["input_features"], f["attention_mask"]
        def context():  # a fresh one for each use: a contextmanager cannot be entered twice
            return unmasked(encoder) if how != "masked" else contextlib.nullcontext()

        if isinstance(how, tuple):  # one call per bucket, so that each clip has its own bucket's window
            for i, clip in enumerate(batch_clips):
                one = processor(audio=[clip])
                f = features(processor.feature_extractor, [clip], bucket_window(len(clip), how[1]))
                one["input_features"], one["feature_attention_mask"] = f["input_features"], f["attention_mask"]
                with context(), torch.no_grad():
                    out = model.generate(**one, max_new_tokens=40)
                texts += processor.batch_decode(out[:, one["input_ids"].shape[1] :])
            continue
        with context(), torch.no_grad():
            out = model.generate(**batch, max_new_tokens=40)
        texts += processor.batch_decode(out[:, batch["input_ids"].shape[1] :])
    return texts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a trained ASR folder (outputs/run_avsr/final) for the WER")
    parser.add_argument("--corpus", default="outputs/synthetic_corpus")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-test", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    test = load_synthetic(args.corpus, "test")
    rows = [test[i] for i in range(min(args.num_test, len(test)))]
    clips = [read_audio(row["audio_path"]) for row in rows]
    if args.model:
        model = LlamaAVSRForConditionalGeneration.from_pretrained(args.model).eval()
        processor = LlamaAVSRProcessor.from_pretrained(args.model)
        processor.audio_window = "trimmed"
    else:
        parts = dict(text_model="smollm2-135m", audio_encoder="whisper-tiny.en", modality="asr")
        model = LlamaAVSRForConditionalGeneration.from_components(**parts).eval()
        processor = LlamaAVSRProcessor.from_components(**parts, audio_window="trimmed")
    extractor = processor.feature_extractor
    options = ["full", "masked", ("bucket", 0.5), ("bucket", 1.0)]
    order = np.random.default_rng(0).permutation(len(clips))
    by_length = sorted(range(len(clips)), key=lambda i: len(clips[i]))

    print(f"| encoding | ms per batch of {args.batch_size}, random order | sorted by length | WER |")
    print("| --- | --- | --- | --- |")
    references = [row["text"] for row in rows]
    for how in options:
        name = how if isinstance(how, str) else f"{how[1]:g}-s buckets"
        random_ms = 1000 * speed(model, extractor, [clips[i] for i in order], how, args.batch_size, args.repeats)
        sorted_ms = 1000 * speed(model, extractor, [clips[i] for i in by_length], how, args.batch_size, args.repeats)
        wer = ""
        if args.model:
            wer = f"{100 * word_error_rate(transcribe(model, processor, clips, how, args.batch_size), references):.2f} %"
        print(f"| {name} | {random_ms:.0f} | {sorted_ms:.0f} | {wer} |", flush=True)


if __name__ == "__main__":
    main()
