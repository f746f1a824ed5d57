"""Manifests as `datasets.Dataset`s of paths, and lazy, hardened audio/video decoders.

One reader for the synthetic corpus and for auto_avsr-preprocessed LRS2/LRS3: both ship csv manifests with rows
`dataset, relative_path, n_video_frames, token_ids, transcript` and a 16 kHz wav next to each mouth-ROI mp4. Raw
LRS2/LRS3 clips (a face mp4 with its audio track) go through the same readers: `read_audio` takes the audio track of
an mp4, `read_video` the frames of any mp4.

The Dataset holds plain string path columns, not datasets' Audio/Video features: those decode with torchcodec, which
we do not depend on. Media is decoded only when a sample is used.

Hardening. Every file is probed with PyAV (FFmpeg's demuxers: they fail cleanly on empty, truncated or non-media
files) before decord or soundfile touch it, and every decoder exception becomes a `MediaError` (a ValueError) that
names the file and the problem. What is checked, and what is fixed up instead (with a warning in the log):

- missing, empty, non-media, truncated or corrupt files, a wav whose header promises more samples than it holds,
  and frames that decode to fewer than the header promises: MediaError;
- an mp4 without the stream asked for (no audio track for ASR/AVSR, no video stream for VSR/AVSR): MediaError;
- no frames, no samples, NaN/inf samples, clips longer than `max_seconds` (30 s by default, Whisper's window;
  pass `max_seconds=None` to read anything) and videos too large to hold in memory: MediaError;
- frames smaller than `min_size` (the lip crop) when asked: MediaError;
- stereo (or more channels): downmixed to mono; another sample rate: resampled to 16 kHz; another frame rate:
  frames picked at 25 fps (nearest frame). Each fix-up is logged as a warning naming the file.

Audio and video of one clip are reconciled by `align_audio_to_video` (the reference's cut-or-pad: the video is the
clock; the audio is cut or zero-padded to frames * 640 samples), which refuses a mismatch of more than
`max_mismatch_s` instead of silently pairing the audio of one recording with the video of another.
"""

import csv
import json
import logging

import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from ..configuration_llama_avsr import LUMA_WEIGHTS, VIDEO_FPS

__all__ = [
    "MAX_CLIP_SECONDS",
    "ManifestError",
    "MediaError",
    "MediaInfo",
    "TranscriptError",
    "align_audio_to_video",
    "check_transcript",
    "load_manifest",
    "load_synthetic",
    "probe_media",
    "read_audio",
    "read_audio_video",
    "read_video",
]

logger = logging.getLogger(__name__)

FPS = VIDEO_FPS
SAMPLE_RATE = 16000
MAX_CLIP_SECONDS = 30.0  # Whisper's window, which the processor enforces too; LRS clips are at most 16 s after auto_avsr
MAX_VIDEO_BYTES = 2**31  # decoded grayscale frames beyond 2 GiB are not a speech clip: refuse before allocating
PROBE_TIMEOUT_S = 10.0  # PyAV's I/O timeout; demuxing a local file takes milliseconds
_SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au"}


class MediaError(ValueError):
    """An audio or video file that cannot be decoded, or decodes to nothing, or to something unusable."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class TranscriptError(ValueError):
    """A transcript that is empty or holds characters no tokenizer should see (control characters, lone surrogates)."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


# ---- probing ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaInfo:
    """What the container header says about a file; 0 / None where a stream is absent."""

    path: str
    has_video: bool
    has_audio: bool
    num_frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0
    duration: float = 0.0  # seconds: the video's span if there is video, else the audio's
    audio_duration: float = 0.0  # seconds, from the audio stream's header

    @property
    def video_duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("Reading mp4 audio and probing media needs PyAV: pip install av") from e
    return av


def _check_file(path: Path, what: str):
    if not path.is_file():
        raise MediaError(path, f"{what} file does not exist")
    if path.stat().st_size == 0:
        raise MediaError(path, f"{what} file is empty")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def probe_media(path) -> MediaInfo:
    """Read the container header with PyAV (no decoding); MediaError if it is not a readable media file."""
    path = Path(path)
    _check_file(path, "media")
    av = _import_av()
    try:
        with av.open(str(path), timeout=PROBE_TIMEOUT_S) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            container_duration = container.duration / 1e6 if container.duration else 0.0
            info = dict(path=str(path), has_video=video is not None, has_audio=audio is not None)
            if video is not None:
                fps = float(video.average_rate or video.guessed_rate or 0)
                span = float(video.duration * video.time_base) if video.duration else container_duration
                # mp4 headers count the frames; other containers may not, then the span gives it
                frames = int(video.frames) or int(round(span * fps))
                info.update(num_frames=frames, fps=fps, width=video.codec_context.width,
                            height=video.codec_context.height, duration=frames / fps if fps else span)
            if audio is not None:
                info.update(sample_rate=int(audio.codec_context.sample_rate or audio.rate or 0),
                            channels=int(audio.codec_context.channels or 0),
                            audio_duration=float(audio.duration * audio.time_base) if audio.duration
                            else container_duration)
                if video is None:
                    info["duration"] = info["audio_duration"]
    except MediaError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError for non-media, truncated headers, ...), OSError
        raise MediaError(path, f"not a readable media file ({_first_line(e)})") from e
    if not info["has_video"] and not info["has_audio"]:
        raise MediaError(path, "holds neither an audio nor a video stream")
    return MediaInfo(**info)


def _check_duration(path, seconds: float, max_seconds: float | None):
    if max_seconds is not None and seconds > max_seconds:
        raise MediaError(
            path, f"lasts {seconds:.1f} s, longer than max_seconds={max_seconds:g}; split it (auto_avsr cuts clips "
            "into segments of at most 16 s) or pass max_seconds=None",
        )


# ---- audio -----------------------------------------------------------------------------------------------------------


def _wav_truncation(path: Path) -> str | None:
    """A problem description if a RIFF/WAVE file declares more sample bytes than it holds (libsndfile silently
    returns the shorter clip), else None. Streaming writers that leave the size unset (0 or 0xFFFFFFFF) pass."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - offset - 8
                if chunk_size not in (0, 0xFFFFFFFF) and available < chunk_size:
                    return f"truncated: the header declares {chunk_size} bytes of samples, the file holds {available}"
                return None
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


def _decode_audio_track(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and the rate of the first audio stream of any container, with PyAV."""
    av = _import_av()
    try:
        with av.open(str(path), timeout=PROBE_TIMEOUT_S) as container:
            if not container.streams.audio:
                raise MediaError(path, "has no audio track (ASR and AVSR need one; pass a wav or use VSR)")
            stream = container.streams.audio[0]
            rate = int(stream.codec_context.sample_rate or stream.rate)
            # planar float keeps the channel layout; we downmix and resample ourselves, like the wav path
            to_float = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
            chunks = []
            for frame in container.decode(stream):
                for converted in to_float.resample(frame):
                    chunks.append(converted.to_ndarray())
            for converted in to_float.resample(None):
                chunks.append(converted.to_ndarray())
    except MediaError:
        raise
    except Exception as e:  # av.error.* for corrupt or truncated streams
        raise MediaError(path, f"cannot decode the audio track ({_first_line(e)})") from e
    if not chunks:
        return np.zeros((0, 1), np.float32), rate
    return np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False), rate


def read_audio(path, target_sr: int = SAMPLE_RATE, max_seconds: float | None = MAX_CLIP_SECONDS) -> np.ndarray:
    """Mono float32 samples at `target_sr` from a wav/flac (soundfile) or from the audio track of an mp4 (PyAV).

    Other channel counts and rates are fixed up with a warning; anything unreadable raises MediaError."""
    path = Path(path)
    _check_file(path, "audio")
    if path.suffix.lower() in _SOUNDFILE_SUFFIXES:
        import soundfile as sf

        truncated = _wav_truncation(path) if path.suffix.lower() == ".wav" else None
        if truncated:
            raise MediaError(path, truncated)
        try:
            info = sf.info(str(path))
            _check_duration(path, info.frames / info.samplerate if info.samplerate else 0.0, max_seconds)
            audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        except MediaError:
            raise
        except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError depending on the damage
            raise MediaError(path, f"cannot read audio ({_first_line(e)})") from e
    else:
        info = probe_media(path)
        if not info.has_audio:
            raise MediaError(path, "has no audio track (ASR and AVSR need one; pass a wav or use VSR)")
        _check_duration(path, info.audio_duration, max_seconds)
        audio, sr = _decode_audio_track(path)
        # FFmpeg decodes a truncated track up to the cut without complaint: compare with what the header promises
        expected = int(info.audio_duration * sr)
        if len(audio) < expected - max(sr // 10, expected // 50):
            raise MediaError(path, f"truncated or corrupt: the header promises {info.audio_duration:.2f} s of audio, "
                                   f"only {len(audio) / sr:.2f} s decode")
    if audio.size == 0:
        raise MediaError(path, "audio holds no samples")
    if not np.isfinite(audio).all():
        raise MediaError(path, "audio holds NaN or infinite samples")
    if audio.shape[1] > 1:
        logger.warning("%s: downmixing %d channels to mono", path, audio.shape[1])
    audio = audio.mean(axis=1)
    if sr != target_sr:
        logger.warning("%s: resampling from %d Hz to %d Hz", path, sr, target_sr)
        audio = soxr.resample(audio, sr, target_sr, quality="VHQ")
    return audio.astype(np.float32, copy=False)


# ---- video -----------------------------------------------------------------------------------------------------------



def _to_gray(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, np.float32)), 0, 255).astype(np.uint8)


def _decode_decord(path: Path, chunk: int = 64) -> np.ndarray:
    import decord

    reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    # chunks of RGB converted to gray at once: peak memory stays near the grayscale result
    parts = [_to_gray(reader.get_batch(range(i, min(i + chunk, n))).asnumpy()) for i in range(0, n, chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0), np.uint8)


def _decode_pyav(path: Path) -> np.ndarray:
    av = _import_av()
    with av.open(str(path), timeout=PROBE_TIMEOUT_S) as container:
        stream = container.streams.video[0]
        frames = [_to_gray(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    return np.stack(frames) if frames else np.zeros((0, 0, 0), np.uint8)


def read_video(path, max_seconds: float | None = MAX_CLIP_SECONDS, min_size: int | None = None,
               target_fps: float | None = FPS) -> np.ndarray:
    """(T, H, W) uint8 grayscale frames (ITU-R BT.601 luma of RGB video), decoded with decord.

    The header is probed first (stream present, frames, length, size); decord's errors, and the rare file that
    decord cannot decode but FFmpeg can (e.g. frames narrower than 32 px), fall back to PyAV with a warning. A video
    at another frame rate is brought to `target_fps` by picking the nearest frames (None keeps its own rate).
    `min_size`: refuse frames smaller than this (the lip crop) here, where the file is known.
    """
    path = Path(path)
    _check_file(path, "video")
    info = probe_media(path)
    if not info.has_video:
        raise MediaError(path, "has no video stream (VSR and AVSR need one)")
    if info.num_frames <= 0:
        raise MediaError(path, "video holds no frames")
    _check_duration(path, info.video_duration, max_seconds)
    if min_size is not None and min(info.width, info.height) < min_size:
        raise MediaError(path, f"frames are {info.height}x{info.width}, smaller than the {min_size}x{min_size} crop")
    if info.num_frames * info.width * info.height > MAX_VIDEO_BYTES:
        raise MediaError(path, f"{info.num_frames} frames of {info.height}x{info.width} are too large to decode "
                               "in memory; crop the mouth region first (llama-avsr preprocess)")
    try:
        frames = _decode_decord(path)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with a C++ backtrace as the message
        logger.warning("%s: decord failed (%s); decoding with PyAV", path, _first_line(e))
        try:
            frames = _decode_pyav(path)
        except Exception as e2:
            raise MediaError(path, f"cannot decode video ({_first_line(e2)})") from e2
    if len(frames) == 0:
        raise MediaError(path, "video holds no frames")
    # A truncated file decodes to fewer frames than its header promises; a frame or two of slack covers encoders
    # that count the last (partial) frame differently.
    if len(frames) < info.num_frames - max(2, info.num_frames // 50):
        raise MediaError(path, f"truncated or corrupt: the header promises {info.num_frames} frames, "
                               f"only {len(frames)} decode")
    if target_fps and info.fps and abs(info.fps - target_fps) > 0.01 * target_fps:
        logger.warning("%s: resampling video from %.3g fps to %g fps (nearest frames)", path, info.fps, target_fps)
        count = max(1, int(round(len(frames) * target_fps / info.fps)))
        frames = frames[np.minimum((np.arange(count) * info.fps / target_fps).round().astype(int), len(frames) - 1)]
    return frames


# ---- both ------------------------------------------------------------------------------------------------------------


def align_audio_to_video(audio: np.ndarray, num_frames: int, path=None, sample_rate: int = SAMPLE_RATE,
                         fps: float = FPS, max_mismatch_s: float = 0.4) -> np.ndarray:
    """The reference's cut-or-pad: the video is the clock, the audio is cut or zero-padded to cover exactly
    `num_frames` frames (640 samples a frame at 16 kHz and 25 fps).

    A difference larger than `max_mismatch_s` (10 frames by default) means the two do not belong together (a wrong
    pairing, a truncated track): MediaError naming `path`. Up to that, the difference is the container's rounding or
    encoder priming and is fixed up silently; above one frame it is logged at debug level."""
    target = int(round(num_frames * sample_rate / fps))
    mismatch = (len(audio) - target) / sample_rate
    if abs(mismatch) > max_mismatch_s:
        raise MediaError(path, f"audio lasts {len(audio) / sample_rate:.2f} s but the video {num_frames / fps:.2f} s "
                               f"({num_frames} frames); they differ by more than {max_mismatch_s:g} s")
    if abs(mismatch) * fps > 1:
        logger.debug("%s: %s audio by %.3f s to match the video", path, "cutting" if mismatch > 0 else "padding",
                     abs(mismatch))
    if len(audio) >= target:
        return audio[:target]
    return np.concatenate([audio, np.zeros(target - len(audio), audio.dtype)])


def read_audio_video(video_path, audio_path=None, max_seconds: float | None = MAX_CLIP_SECONDS,
                     min_size: int | None = None, max_mismatch_s: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(audio 16 kHz mono, frames (T, H, W)) of one clip, the audio from `audio_path` or else from the mp4's own
    track, aligned to the video with `align_audio_to_video`."""
    frames = read_video(video_path, max_seconds=max_seconds, min_size=min_size)
    audio = read_audio(audio_path if audio_path is not None else video_path, max_seconds=max_seconds)
    return align_audio_to_video(audio, len(frames), audio_path or video_path, max_mismatch_s=max_mismatch_s), frames


# ---- transcripts -----------------------------------------------------------------------------------------------------


def check_transcript(text: str, path=None) -> str:
    """NFC-normalised, whitespace-collapsed `text`; TranscriptError (naming `path`) if it is empty or holds control
    characters, lone surrogates or unassigned code points. Those either crash a tokenizer's Rust side or turn into
    unknown / byte tokens the model was never trained to emit: a silent wrong label."""
    if not isinstance(text, str):
        raise TranscriptError(path, f"transcript must be a string, got {type(text).__name__}")
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Co", "Cn") and ch not in "\t\n\r":
            raise TranscriptError(path, f"transcript holds the character U+{ord(ch):04X} ({category}), which the "
                                        "tokenizer cannot encode as text")
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text:
        raise TranscriptError(path, "transcript is empty")
    return text


# ---- manifests -------------------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """Rows of a manifest that cannot be trained or tested on; each problem starts with `csv:line`."""

    def __init__(self, csv_path, problems: list[str]):
        shown = "\n  ".join(problems[:_MANIFEST_PROBLEMS_SHOWN])
        more = f"\n  ... and {len(problems) - _MANIFEST_PROBLEMS_SHOWN} more" \
            if len(problems) > _MANIFEST_PROBLEMS_SHOWN else ""
        super().__init__(f"{csv_path}: {len(problems)} bad rows:\n  {shown}{more}")
        self.path = str(csv_path)
        self.problems = problems


_MANIFEST_PROBLEMS_SHOWN = 10


def load_manifest(csv_path, root, fps: int = FPS, check_files: bool = True,
                  max_seconds: float | None = MAX_CLIP_SECONDS):
    """A `datasets.Dataset` with one row per csv line in auto_avsr's layout.

    `relative_path` is resolved against `root` (for auto_avsr's LRS3 csvs that is `ROOT/lrs3`; for a csv that mixes
    data sets, pass a dict {dataset name: directory}). Columns: id (relative path without extension), audio_path
    (.wav), video_path (.mp4), text, num_frames (video frames, from the csv), duration (num_frames / fps: the
    video's span, which covers the audio to within one frame).

    Every row is checked here, not when a batch first needs it: fewer than 5 columns, a frame count that is not a
    positive integer, a clip longer than `max_seconds` (Whisper's 30-s window; None: no limit), a transcript that
    `check_transcript` refuses (empty; control characters other than tab, newline and carriage return, which are
    whitespace and collapse; lone surrogates; unassigned code points) and, with `check_files`, a missing wav or mp4.
    All bad rows are reported in one `ManifestError` naming the csv and each line. Transcripts are stored as
    `check_transcript` returns them: NFC-normalised, whitespace collapsed.
    """
    import datasets

    columns = {"id": [], "audio_path": [], "video_path": [], "text": [], "duration": [], "num_frames": []}
    problems = []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            where = f"{csv_path}:{line}"
            if len(row) < 5:
                problems.append(f"{where}: expected 5 columns (dataset, path, frames, tokens, text), got {len(row)}")
                continue
            dataset, relative, frames = row[0], row[1], row[2].strip()
            if not frames.isdigit() or int(frames) == 0:
                problems.append(f"{where}: the frame count {frames!r} is not a positive integer")
                continue
            frames = int(frames)
            if max_seconds is not None and frames / fps > max_seconds:
                problems.append(f"{where}: the clip lasts {frames / fps:.1f} s, longer than max_seconds="
                                f"{max_seconds:g} (Whisper's window); cut it or drop the row")
                continue
            try:
                text = check_transcript(",".join(row[4:]), where)  # auto_avsr writes transcripts unquoted
            except TranscriptError as e:
                problems.append(str(e))
                continue
            if isinstance(root, dict) and dataset not in root:
                problems.append(f"{where}: data set {dataset!r} is not one of the roots given ({sorted(root)})")
                continue
            base = Path(root[dataset] if isinstance(root, dict) else root) / relative
            stem = base.with_suffix("")
            audio_path, video_path = stem.with_suffix(".wav"), stem.with_suffix(".mp4")
            absent = [str(p) for p in (audio_path, video_path) if check_files and not p.is_file()]
            if absent:
                problems.append(f"{where}: no such file {' or '.join(absent)}")
                continue
            columns["id"].append(str(Path(relative).with_suffix("")))
            columns["audio_path"].append(str(audio_path))
            columns["video_path"].append(str(video_path))
            columns["text"].append(text)
            columns["num_frames"].append(frames)
            columns["duration"].append(frames / fps)
    if problems:
        raise ManifestError(csv_path, problems)
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
