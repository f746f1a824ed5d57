"""The synthetic audio-visual corpus: the embedded default data set, built offline from a seed.

Sentences come from a GRID-style grammar ("place blue at f two now") and a small natural-sentence grammar; espeak-ng
speaks them with several voices and rates (tts.py), and a rendered mouth follows the visemes of the phonemes with
their exact timings (mouth.py). Layout, mirroring auto_avsr's preprocessed LRS2/LRS3 so the same loader reads both:

    OUT/corpus_info.json                  parameters, and whether the build finished
    OUT/labels/{train,validation,test}.csv  dataset, relative_path, n_video_frames, token_ids (empty), transcript
    OUT/SPLIT/SPEAKER/ID.wav              16 kHz mono PCM-16
    OUT/SPLIT/SPEAKER/ID.mp4              25 fps, 96x96 grayscale mouth (H.264, yuv420p)
    OUT/SPLIT/SPEAKER/ID.json             text, voice, rate, phones / words / visemes with times in seconds

Sentences are disjoint across splits. Test sentences are drawn first, then validation, then train, so the test set
depends only on the seed and its own size. Each utterance draws its speaker, rate and jitter from its own generator
seeded by (seed, split, index): the result is the same pixels and samples whatever the worker count or resume order.

Every file is written to a temporary name and moved into place; an utterance is complete when its json (written
last) exists. A rerun with the same parameters skips complete utterances; the manifests and the `complete` flag in
corpus_info.json are written last, so a half-written corpus is detected by the loader.
"""

import csv
import io
import json
import logging
import multiprocessing
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import write_bytes_atomic
from .mouth import FPS, FRAME_SIZE, Appearance, mouth_track, num_video_frames, render_mouth, viseme_segments

__all__ = [
    "SPLITS",
    "SPEAKERS",
    "Speaker",
    "grid_sentence",
    "natural_sentence",
    "split_sentences",
    "make_corpus",
    "add_make_corpus_arguments",
    "run_make_corpus",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# 2: espeak-ng random seed set per utterance (breath noise of "+f2"-like voices); 3: soxr resamples 22.05 -> 16 kHz
_FORMAT_VERSION = 3

# GRID (Cooke et al. 2006): command colour preposition letter digit adverb; "w" is excluded as in GRID
_GRID = (
    ("bin", "lay", "place", "set"),
    ("blue", "green", "red", "white"),
    ("at", "by", "in", "with"),
    tuple("abcdefghijklmnopqrstuvxyz"),
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    ("again", "now", "please", "soon"),
)

# a small natural grammar: a few templates over everyday words, enough for several thousand distinct sentences
_WORDS = {
    "det": ("the", "a", "my", "your", "this"),
    "adj": ("old", "small", "big", "green", "warm", "quiet", "heavy", "bright", "broken", "new"),
    "noun": ("dog", "house", "garden", "river", "window", "letter", "teacher", "boat", "table", "bottle", "child", "road"),
    "subj": ("she", "he", "we", "they", "i", "you"),
    "past": ("found", "painted", "opened", "moved", "watched", "carried", "cleaned", "closed", "bought", "needed"),
    "imp": ("open", "move", "clean", "close", "find", "bring", "check", "paint"),
    "prep": ("near", "behind", "under", "beside", "inside"),
    "time": ("today", "yesterday", "at night", "in the morning", "after lunch", "every day"),
}
_TEMPLATES = (
    ("det", "adj", "noun", "is", "prep", "the", "noun"),
    ("subj", "past", "det", "adj", "noun", "time"),
    ("please", "imp", "det", "noun", "prep", "the", "noun"),
    ("subj", "past", "the", "noun", "prep", "det", "noun"),
)


def grid_sentence(rng: np.random.Generator) -> str:
    return " ".join(slot[rng.integers(len(slot))] for slot in _GRID)


def natural_sentence(rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return " ".join(_WORDS[w][rng.integers(len(_WORDS[w]))] if w in _WORDS else w for w in template)


def split_sentences(counts: dict[str, int], seed: int, natural_fraction: float = 0.5) -> dict[str, list[str]]:
    """Distinct sentences per split, disjoint across splits; test first, then validation, then train."""
    rng = np.random.default_rng([seed, 0x5E7])
    seen, out = set(), {}
    for split in ("test", "validation", "train"):
        sentences, tries = [], 0
        while len(sentences) < counts.get(split, 0):
            tries += 1
            if tries > 100 * (counts[split] + 100):
                raise ValueError(f"cannot draw {counts[split]} distinct {split} sentences; the grammars are too small")
            s = natural_sentence(rng) if rng.random() < natural_fraction else grid_sentence(rng)
            if s not in seen:
                seen.add(s)
                sentences.append(s)
        out[split] = sentences
    return out


@dataclass(frozen=True)
class Speaker:
    name: str
    voice: str  # espeak-ng voice, optionally with a "+variant"
    rate: int  # words per minute; each utterance varies it by up to +-15


# Several English accents, male and female variants, different speaking rates; shared by all splits (as in GRID).
# Voices the frozen Whisper tiny.en encoder cannot follow are left out: on 120 test utterances its own decoder had
# WER 0.92 on en-gb-scotland+f1 and 0.68 on en-029+m7 against 0.49-0.66 on the voices below.
SPEAKERS = (
    Speaker("s01", "en-us", 150),
    Speaker("s02", "en-us+f2", 165),
    Speaker("s03", "en+m3", 140),
    Speaker("s04", "en-gb-x-rp+f4", 155),
    Speaker("s07", "en-us-nyc+m2", 170),
    Speaker("s08", "en-us+m1", 135),
)


def _encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 mp4 of grayscale frames, encoded so that the same frames always give the same bytes.

    Single-threaded and without x264's macroblock-tree rate control, which gave different bytes for identical input
    from one encode to the next. crf 18 keeps the mean absolute pixel error near 2 gray levels.
    """
    try:
        import av
    except ImportError as e:
        raise ImportError("Writing the synthetic corpus videos needs PyAV: pip install 'llama-avsr[corpus]'") from e
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"  # what every decoder (decord included) reads
        stream.codec_context.options = {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _rounded(items):
    return [[name, round(start, 5), round(end, 5)] for name, start, end in items]


def _build_utterance(job) -> dict:
    """Synthesise, render and write one utterance (skipped when already complete); returns its manifest row."""
    out_dir, split, index, text, seed = job
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    speaker_index = int(rng.integers(len(SPEAKERS)))
    speaker = SPEAKERS[speaker_index]
    uid = f"{index:05d}"
    folder = Path(out_dir) / split / speaker.name
    meta_path = folder / f"{uid}.json"
    if meta_path.exists() and (folder / f"{uid}.wav").exists() and (folder / f"{uid}.mp4").exists():
        meta = json.loads(meta_path.read_text())
        return {"relative_path": f"{split}/{speaker.name}/{uid}", "num_frames": meta["num_frames"], "text": text}

    from .tts import SAMPLE_RATE, synthesize  # GPL espeak-ng: loaded only when an utterance is actually built

    rate = speaker.rate + int(rng.integers(-15, 16))
    utt = synthesize(text, voice=speaker.voice, rate=rate)
    num_frames = num_video_frames(len(utt.audio), SAMPLE_RATE, FPS)
    appearance = Appearance.sample(np.random.default_rng([seed, 1000 + speaker_index]))
    frames = render_mouth(mouth_track(utt.phonemes, num_frames, FPS), appearance, rng, FRAME_SIZE)

    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / f"{uid}.wav", _encode_wav(utt.audio, SAMPLE_RATE))
    write_bytes_atomic(folder / f"{uid}.mp4", _encode_mp4(frames, FPS))
    meta = {
        "id": f"{split}/{speaker.name}/{uid}",
        "text": text,
        "speaker": speaker.name,
        "voice": speaker.voice,
        "rate": rate,
        "sample_rate": SAMPLE_RATE,
        "num_samples": len(utt.audio),
        "duration": round(utt.duration, 5),
        "fps": FPS,
        "num_frames": num_frames,
        "frame_size": FRAME_SIZE,
        "phones": _rounded(utt.phonemes),
        "words": _rounded(utt.words),
        "visemes": _rounded(viseme_segments(utt.phonemes)),
    }
    write_bytes_atomic(meta_path, (json.dumps(meta) + "\n").encode())  # last: marks the utterance complete
    return {"relative_path": meta["id"], "num_frames": num_frames, "text": text}


def _write_manifest(path: Path, rows: list[dict]):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        # auto_avsr's column order: dataset, relative_path, n_video_frames, token_ids, transcript
        writer.writerow(["synthetic", row["relative_path"] + ".mp4", row["num_frames"], "", row["text"]])
    write_bytes_atomic(path, buffer.getvalue().encode())


def _all_files_present(out: Path) -> bool:
    """Whether every utterance in the manifests still has its wav, mp4 and json (a cheap stat per file)."""
    for split in SPLITS:
        manifest = out / "labels" / f"{split}.csv"
        if not manifest.exists():
            return False
        with open(manifest, newline="") as f:
            for row in csv.reader(f):
                stem = out / Path(row[1]).with_suffix("")
                if not all(stem.with_suffix(ext).exists() for ext in (".wav", ".mp4", ".json")):
                    logger.warning("%s is missing files of %s; rebuilding what is missing", out, stem)
                    return False
    return True


def make_corpus(
    out_dir,
    num_train: int = 2000,
    num_validation: int = 150,
    num_test: int = 200,
    seed: int = 0,
    natural_fraction: float = 0.5,
    num_workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build (or finish, or reuse) the synthetic corpus in `out_dir`; returns its path.

    A corpus built with the same parameters is reused as is; an unfinished one is resumed. One built with different
    parameters raises, unless `overwrite` is set, which deletes it (only the files this function writes) first.
    """
    out = Path(out_dir)
    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    params = {
        "format_version": _FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "natural_fraction": natural_fraction,
        "speakers": [asdict(s) for s in SPEAKERS],
        "sample_rate": 16000,
        "fps": FPS,
        "frame_size": FRAME_SIZE,
    }
    info_path = out / "corpus_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        existing = {k: v for k, v in info.items() if k != "complete"}
        if existing != params:
            if not overwrite:
                changed = sorted(k for k in params.keys() | existing.keys() if params.get(k) != existing.get(k))
                raise ValueError(
                    f"{out} holds a synthetic corpus built with other parameters ({', '.join(changed)} differ); "
                    "choose another directory, or rebuild it with make_corpus(..., overwrite=True), `llama-avsr "
                    "make-corpus --overwrite` or `examples/run_avsr.py --overwrite_corpus`"
                )
            logger.warning("Deleting the synthetic corpus in %s to rebuild it with new parameters", out)
            for name in (*SPLITS, "labels"):
                shutil.rmtree(out / name, ignore_errors=True)
            info_path.unlink()
        elif info.get("complete") and _all_files_present(out):
            logger.info("Reusing the synthetic corpus in %s", out)
            return out
        else:
            logger.info("Resuming the unfinished synthetic corpus in %s", out)

    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(info_path, (json.dumps({**params, "complete": False}, indent=1) + "\n").encode())
    sentences = split_sentences(counts, seed, natural_fraction)
    jobs = [(str(out), split, i, text, seed) for split in SPLITS for i, text in enumerate(sentences[split])]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="synthetic corpus", unit="utt", disable=not progress)
    if num_workers > 1:
        # spawn: each worker starts its own libespeak-ng (the library cannot be shared or re-initialised)
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            rows = []
            for row in pool.imap(_build_utterance, jobs, chunksize=4):
                rows.append(row)
                bar.update()
    else:
        rows = []
        for job in jobs:
            rows.append(_build_utterance(job))
            bar.update()
    bar.close()

    (out / "labels").mkdir(exist_ok=True)
    for split in SPLITS:
        _write_manifest(out / "labels" / f"{split}.csv", [r for r in rows if r["relative_path"].startswith(split + "/")])
    write_bytes_atomic(info_path, (json.dumps({**params, "complete": True}, indent=1) + "\n").encode())
    logger.info("Synthetic corpus ready in %s (%s)", out, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return out


def add_make_corpus_arguments(parser):
    """Arguments of `llama-avsr make-corpus`."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-validation", type=int, default=150)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--natural-fraction", type=float, default=0.5, help="share of natural (non-GRID) sentences")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a corpus made with other parameters")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_make_corpus(args) -> int:
    make_corpus(
        args.out,
        num_train=args.num_train,
        num_validation=args.num_validation,
        num_test=args.num_test,
        seed=args.seed,
        natural_fraction=args.natural_fraction,
        num_workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    return 0
