"""How intelligible each synthetic voice is to the frozen audio encoder: Whisper's own decoder, per voice, on a split
of the synthetic corpus. A voice the encoder cannot follow gives the LLM little to learn from.

    python examples/benchmarks/voice_intelligibility.py [--corpus outputs/synthetic_corpus] [--num 120]
"""

import argparse
import collections
import json
import re
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from modeling_llama_avsr.configuration_llama_avsr import resolve_component
from modeling_llama_avsr.data import load_synthetic, read_audio
from trainer import word_error_rate


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", default="outputs/synthetic_corpus")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num", type=int, default=120)
    parser.add_argument("--whisper", default="whisper-tiny.en")
    args = parser.parse_args()

    path = resolve_component(args.whisper)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    processor = WhisperProcessor.from_pretrained(path)
    dataset = load_synthetic(args.corpus, args.split)
    by_voice = collections.defaultdict(list)
    for row in dataset.select(range(min(args.num, len(dataset)))):
        voice = json.loads(Path(row["video_path"]).with_suffix(".json").read_text())["voice"]
        by_voice[voice].append(row)

    print(f"{args.whisper} decoding {args.num} {args.split} utterances of {args.corpus}")
    for voice, rows in sorted(by_voice.items()):
        features = processor([read_audio(r["audio_path"]) for r in rows], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(features.input_features, max_new_tokens=40)
        # Whisper writes punctuation and capitals; the corpus transcripts have neither.
        hypotheses = [re.sub(r"[^\w\s']", "", t).lower().strip()
                      for t in processor.batch_decode(generated, skip_special_tokens=True)]
        wer = word_error_rate(hypotheses, [r["text"] for r in rows])
        print(f"  {voice:<20} {len(rows):4d} utterances  WER {wer:.2f}")


if __name__ == "__main__":
    main()
