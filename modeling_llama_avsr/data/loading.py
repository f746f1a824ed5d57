"""Manifests as `datasets.Dataset`s of paths, and lazy audio/video decoders.

One reader for the synthetic corpus and for auto_avsr-preprocessed LRS2/LRS3: both ship csv manifests with rows
`dataset, relative_path, n_video_frames, token_ids, transcript` and a 16 kHz wav next to each mouth-ROI mp4.

The Dataset holds plain string path columns, not datasets' Audio/Video features: those decode with torchcodec, which
we do not depend on. Media is decoded only when a sample is used (soundfile for audio, decord for video), and any
unreadable or empty file raises `MediaError` naming the file, instead of failing somewhere inside a decoder.
"""

import csv
import json
import logging
from pathlib import Path

import numpy as np

from .resample import resample

__all__ = ["MediaError", "load_manifest", "load_synthetic", "read_audio", "read_video"]

logger = logging.getLogger(__name__)

FPS = 25


class MediaError(ValueError):
    """An audio or video file that cannot be decoded, or decodes to nothing."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


def load_manifest(csv_path, root, fps: int = FPS):
    """A `datasets.Dataset` with one row per csv line in auto_avsr's layout.

    `relative_path` is resolved against `root` (for auto_avsr's LRS3 csvs that is `ROOT/lrs3`; for a csv that mixes
    data sets, pass a dict {dataset name: directory}). Columns: id (relative path without extension), audio_path
    (.wav), video_path (.mp4), text, num_frames (video frames, from the csv), duration (num_frames / fps: the
    video's span, which covers the audio to within one frame).
    """
    import datasets

    columns = {"id": [], "audio_path": [], "video_path": [], "text": [], "duration": [], "num_frames": []}
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) < 5:
                raise ValueError(f"{csv_path}:{line}: expected 5 columns (dataset, path, frames, tokens, text)")
            dataset, relative, frames = row[0], row[1], int(row[2])
            base = Path(root[dataset] if isinstance(root, dict) else root) / relative
            stem = base.with_suffix("")
            columns["id"].append(str(Path(relative).with_suffix("")))
            columns["audio_path"].append(str(stem.with_suffix(".wav")))
            columns["video_path"].append(str(stem.with_suffix(".mp4")))
            columns["text"].append(",".join(row[4:]))  # auto_avsr writes transcripts unquoted
            columns["num_frames"].append(frames)
            columns["duration"].append(frames / fps)
    return datasets.Dataset.from_dict(columns)


def load_synthetic(root, split: str):
    """The `split` ("train", "validation" or "test") of a corpus written by `make_corpus`."""
    root = Path(root)
    info_path = root / "corpus_info.json"
    if not info_path.exists():
        raise FileNotFoundError(f"No synthetic corpus in {root}: run `llama-avsr make-corpus --out {root}`")
    if not json.loads(info_path.read_text()).get("complete"):
        raise ValueError(
            f"The synthetic corpus in {root} is only partly written; run `llama-avsr make-corpus` with the same "
            "parameters to finish it"
        )
    csv_path = root / "labels" / f"{split}.csv"
    if not csv_path.exists():
        raise ValueError(f"The synthetic corpus in {root} has no split {split!r}")
    return load_manifest(csv_path, root)


def read_audio(path, target_sr: int = 16000) -> np.ndarray:
    """Mono float32 samples at `target_sr`; other channel counts and rates are fixed up with a warning."""
    import soundfile as sf

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError depending on the damage
        raise MediaError(path, f"cannot read audio ({e})") from e
    if audio.size == 0:
        raise MediaError(path, "audio file holds no samples")
    if audio.shape[1] > 1:
        logger.warning("%s: downmixing %d channels to mono", path, audio.shape[1])
    audio = audio.mean(axis=1)
    if sr != target_sr:
        logger.warning("%s: resampling from %d Hz to %d Hz", path, sr, target_sr)
        audio = resample(audio, sr, target_sr)
    return audio.astype(np.float32, copy=False)


def read_video(path) -> np.ndarray:
    """(T, H, W) uint8 grayscale frames (ITU-R BT.601 luma of RGB video)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "video file does not exist")
    if path.stat().st_size == 0:
        raise MediaError(path, "video file is empty")
    try:
        import decord
    except ImportError as e:
        raise ImportError("Reading videos needs decord: pip install decord") from e
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        if len(reader) == 0:
            raise MediaError(path, "video holds no frames")
        frames = reader.get_batch(range(len(reader))).asnumpy()
    except MediaError:
        raise
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with a C++ backtrace as the message
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MediaError(path, f"cannot decode video ({first_line})") from e
    if frames.ndim == 4 and frames.shape[-1] == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        frames = np.clip(np.rint(frames.astype(np.float32) @ weights), 0, 255).astype(np.uint8)
    return frames
