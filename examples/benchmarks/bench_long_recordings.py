"""Long recordings made of test clips: WER of the pipeline's chunked transcript against the clips one by one.

    python examples/benchmarks/bench_long_recordings.py --model outputs/run_avsr/final \
        [--corpus outputs/synthetic_corpus] [--pauses 0.3 0.2 0.1 0.0] [--recordings 3]

Each recording joins 30 consecutive test clips with `pause` seconds of silence between them (0: gapless). The
one-by-one WER decodes the same clips alone (batch_size 8: the batch does not matter). Extra pipeline arguments as
JSON: --settings '[{}, {"chunk_length_s": 30}]'.
"""

import argparse
import json
import logging
import time

import numpy as np
from transformers import pipeline

import modeling_llama_avsr  # noqa: F401  (registers the task)
from modeling_llama_avsr.data import load_synthetic, read_audio
from trainer.metrics import word_error_rate

CLIPS_PER_RECORDING = 30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained ASR folder (outputs/run_avsr/final)")
    parser.add_argument("--corpus", default="outputs/synthetic_corpus")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.3, 0.2, 0.1, 0.0])
    parser.add_argument("--recordings", type=int, default=3)
    parser.add_argument("--settings", type=json.loads, default=[{}])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    test = load_synthetic(args.corpus, "test")
    count = args.recordings * CLIPS_PER_RECORDING
    rows = [test[i] for i in range(count)]
    clips = [read_audio(row["audio_path"]) for row in rows]
    groups = [range(k * CLIPS_PER_RECORDING, (k + 1) * CLIPS_PER_RECORDING) for k in range(args.recordings)]
    references = [" ".join(rows[i]["text"] for i in group) for group in groups]
    pipe = pipeline("audio-visual-speech-recognition", model=args.model)
    print(f"training_clip_seconds {pipe.processor.training_clip_seconds}, default chunk "
          f"{pipe.default_chunk_length_s:g} s")
    single = [out["text"] for out in pipe(clips, batch_size=8)]
    one_by_one = word_error_rate([" ".join(single[i] for i in group) for group in groups], references)
    print(f"one by one: WER {100 * one_by_one:.2f} % ({count} clips)")
    for pause in args.pauses:
        silence = np.zeros(int(pause * 16000), np.float32)
        recordings = [np.concatenate([part for i in group for part in (clips[i], silence)]) for group in groups]
        for settings in args.settings:
            start = time.perf_counter()
            texts = [out["text"] for out in pipe(recordings, batch_size=8, **settings)]
            print(f"pause {pause:g} s {settings}: WER {100 * word_error_rate(texts, references):.2f} % "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
