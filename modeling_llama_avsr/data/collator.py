"""Turning rows of path columns into model batches: decode, augment, process.

Augmentation follows the reference recipe where it applies here: babble or white noise at an SNR drawn per
utterance, a random 88x88 crop of the mouth region, time masking of video frames and (`audio_time_mask`) of the
waveform in training; a centre crop and clean audio in evaluation, unless a fixed noise condition is asked for (the
noisy-evaluation switch). Noise drawn for evaluation is seeded by the utterance id, so ASR and AVSR models are scored
on exactly the same noisy audio.

Training augmentation is drawn, for each utterance, from one generator seeded with (seed, epoch, utterance), which
the collator passes to every augmentation of that utterance: nothing depends on which batches came before, so a run
resumed from a checkpoint augments exactly as the uninterrupted one did, and DataLoader workers need no shared state.
Call `set_epoch` at every epoch (AVSRTrainer does), or every epoch augments alike.
"""

import zlib
from dataclasses import dataclass, field

import numpy as np

from ..configuration_llama_avsr import SAMPLING_RATE
from .loading import read_audio, read_video

# The reference draws training SNRs from this set (inf = clean).
REFERENCE_SNRS_DB = (-5.0, 0.0, 5.0, 10.0, 15.0, 20.0, float("inf"))


@dataclass
class NoiseSpec:
    """Additive noise: `kind` "babble" (a sum of other utterances) or "white"; SNR in dB, one drawn per utterance."""

    kind: str = "babble"
    snr_db: tuple[float, ...] = REFERENCE_SNRS_DB
    babble_speakers: int = 4

    def __post_init__(self):
        if self.kind not in ("babble", "white"):
            raise ValueError(f"noise kind must be 'babble' or 'white', got {self.kind!r}")


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that 10 log10(P_speech / P_noise) = snr_db (noise tiled or cut to the speech)."""
    if not np.isfinite(snr_db):
        return speech
    noise = np.resize(noise, speech.shape)
    speech_power = float(np.mean(speech**2)) + 1e-12
    noise_power = float(np.mean(noise**2)) + 1e-12
    scale = np.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10)))
    return (speech + scale * noise).astype(np.float32)


def time_mask_video(frames: np.ndarray, rng: np.random.Generator, max_per_second: int = 10, fps: int = 25):
    """In every second of video, replace a random run of up to `max_per_second` frames by the clip's mean image
    (the reference masks up to 10 of every 25 frames)."""
    frames = frames.copy()
    mean = frames.mean(0).astype(frames.dtype)
    for start in range(0, len(frames), fps):
        width = int(rng.integers(0, max_per_second + 1))
        if width:
            begin = start + int(rng.integers(0, max(1, min(fps, len(frames) - start) - width + 1)))
            frames[begin : begin + width] = mean
    return frames


def time_mask_audio(audio: np.ndarray, rng: np.random.Generator, max_seconds: float = 0.4, every_seconds: float = 1.0,
                    sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """The reference's adaptive time mask on a waveform (its AdaptiveTimeMask(6400, 16000)): one mask per started
    second, each zeroing a run of U{0 .. 0.4 s} samples. As the reference draws them, each mask's start is uniform
    over [0, len - t) for another U{0 .. 0.4 s} draw t (no mask when t is 0 or not shorter than the clip); masks may
    overlap, and a run is cut at the clip's end."""
    audio = audio.copy()
    window, stride = int(max_seconds * sampling_rate), int(every_seconds * sampling_rate)
    length = len(audio)
    for _ in range(-(-length // stride)):
        bound, width = (int(x) for x in rng.integers(0, window, size=2))
        if bound == 0 or bound >= length:
            continue
        start = int(rng.integers(0, length - bound))
        audio[start : start + width] = 0
    return audio


def random_crop(frames: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = frames.shape[1:3]
    if h < size or w < size:
        return frames  # the processor reports frames smaller than its crop
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return frames[:, top : top + size, left : left + size]


@dataclass
class AVSRDataCollator:
    """Rows with `audio_path` / `video_path` / `text` (the loaders' columns) -> a processor batch with labels.

    train: augment (noise, random crop, time masking), from (seed, epoch, utterance id or path): see the module
    docstring. eval_noise: a fixed noise condition at evaluation (e.g.
    NoiseSpec("babble", (0.0,))), seeded per utterance. babble_pool: audio paths the babble is drawn from (the training
    split: never the utterance itself). audio_time_mask: the reference's waveform time masking (`time_mask_audio`),
    before the noise as in the reference; training only, off by default.
    """

    processor: object
    train: bool = False
    train_noise: NoiseSpec | None = None
    eval_noise: NoiseSpec | None = None
    babble_pool: list[str] = field(default_factory=list)
    video_time_mask: bool = True
    audio_time_mask: bool = False
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        self._babble_cache: dict[str, np.ndarray] = {}

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _generator(self, row: dict) -> np.random.Generator:
        """The one generator of a training utterance's augmentation."""
        key = row.get("id") or row.get("audio_path") or row.get("video_path")
        return np.random.default_rng([self.seed, self.epoch, zlib.crc32(str(key).encode())])

    @property
    def augments(self) -> bool:
        """Whether an utterance's media can differ from one batch to the next (noise, random crops, time masking)."""
        return self.train and (self.train_noise is not None or self.audio_time_mask or self.processor.uses_video)

    def _noise(self, spec: NoiseSpec, length: int, rng: np.random.Generator, exclude: str) -> np.ndarray:
        if spec.kind == "white":
            return rng.standard_normal(length).astype(np.float32)
        pool = [p for p in self.babble_pool if p != exclude]
        if not pool:
            raise ValueError("babble noise needs a babble_pool of other utterances' audio paths")
        babble = np.zeros(length, np.float32)
        for index in rng.choice(len(pool), size=min(spec.babble_speakers, len(pool)), replace=False):
            path = pool[int(index)]
            if path not in self._babble_cache:
                self._babble_cache[path] = read_audio(path)
            talker = self._babble_cache[path]
            talker = talker / (np.sqrt(np.mean(talker**2)) + 1e-8)  # equal loudness per talker
            babble += np.resize(talker, length)
        return babble

    def _noisy(self, audio: np.ndarray, row: dict, rng: np.random.Generator | None) -> np.ndarray:
        spec = self.train_noise if self.train else self.eval_noise
        if spec is None:
            return audio
        # Evaluation noise is a function of the utterance, so every model hears the same noisy clip.
        if not self.train:
            rng = np.random.default_rng(zlib.crc32(row["audio_path"].encode()) + self.seed)
        snr = float(rng.choice(np.asarray(spec.snr_db, dtype=np.float64)))
        return mix_at_snr(audio, self._noise(spec, len(audio), rng, row["audio_path"]), snr)

    def __call__(self, rows: list[dict]):
        processor = self.processor
        rngs = [self._generator(row) if self.train else None for row in rows]
        audio = videos = None
        if processor.uses_audio:
            audio = [read_audio(row["audio_path"]) for row in rows]
            if self.train and self.audio_time_mask:
                audio = [time_mask_audio(clip, rng) for clip, rng in zip(audio, rngs)]
            audio = [self._noisy(clip, row, rng) for clip, row, rng in zip(audio, rows, rngs)]
        if processor.uses_video:
            videos = [read_video(row["video_path"], min_size=processor.video_crop_size) for row in rows]
            if self.train:
                size = processor.video_crop_size
                videos = [random_crop(v, size, rng) for v, rng in zip(videos, rngs)]
                if self.video_time_mask:
                    videos = [time_mask_video(v, rng) for v, rng in zip(videos, rngs)]
        return processor(audio=audio, videos=videos, text=[row["text"] for row in rows])


__all__ = ["AVSRDataCollator", "NoiseSpec", "mix_at_snr", "time_mask_audio", "time_mask_video", "random_crop",
           "REFERENCE_SNRS_DB"]
