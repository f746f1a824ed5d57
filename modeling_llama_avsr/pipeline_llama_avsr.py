"""The "audio-visual-speech-recognition" pipeline: media in, transcript out.

    from transformers import pipeline
    import modeling_llama_avsr  # registers the task

    asr = pipeline("audio-visual-speech-recognition", model="outputs/run1/final")
    asr("clip.mp4")                                   # {"text": "..."}
    asr(["a.mp4", "b.wav"], batch_size=8, max_new_tokens=32, num_beams=4)

What an input may be, depending on the model's modality (ASR needs audio, VSR video, AVSR both):
- a path: an audio file (wav, flac, ogg, mp3: ASR) or a video (mp4, mkv, avi, mov, webm), whose frames are the mouth
  region of interest (VSR, AVSR) and whose audio track feeds ASR and AVSR;
- a 1-D array: 16 kHz mono audio (float in [-1, 1], or integer PCM, which is scaled by its type's range);
  a (T, H, W[, C]) uint8 array: mouth frames at 25 fps;
- a dict with "audio" and/or "video" (each a path or an array) and optionally "sampling_rate" for an audio array;
  transformers' ASR form {"raw" or "array": samples, "sampling_rate": sr} is accepted too.

Long inputs. The model was trained on short utterances (and Whisper sees at most 30 s), so an input longer than
`chunk_length_s` is cut into pieces, each transcribed on its own, and the texts are joined. By default
`chunk_length_s` is the longest clip the model was trained on plus 0.5 s for the pauses around it
(`processor.training_clip_seconds`, recorded by examples/run_avsr.py), or DEFAULT_CHUNK_SECONDS (10 s) when the
processor records none. Cuts fall on video-frame boundaries (40 ms), so audio and video are cut at the same
instant. With audio, a piece ends in the middle of the longest pause in it (a cut with 40-ms frames below the voice
threshold on both sides, so pauses of about 0.12 s or more are found; the earliest of equally long pauses, and none
that would leave a piece shorter than MIN_PIECE_SECONDS, 1 s), so that a piece holds one utterance where the
speaker pauses between them. Without a pause, it ends where the 160 ms around the cut are quietest within the last
`boundary_search_s` seconds (default 5 s, at most half a chunk) before the limit. Video-only input is cut at fixed
intervals. A cut piece is then trimmed to its voiced span, placed to 5 ms (the training clips start and end within a
few ms of their first and last voiced sound; half a pause of leading silence made the model misread the first word,
and edges on the 20-ms frame grid, which can cut up to 20 ms of speech, still cost it words). `stride_length_s` (s or
(left, right)) extends every piece by that much audio/video on each side, and
the overlapping texts are merged where their words agree (left half of the overlap from the earlier piece, right
half from the later). A piece longer than LONG_CHUNK_FACTOR (1.5) times the longest training clip is transcribed
with a warning: expect lost or invented words. An input no longer than `chunk_length_s` is never cut, so short
clips give exactly what `model.generate` gives on the processor's output.

Timestamps. `return_timestamps=True` adds "chunks": [{"text", "timestamp": (start_s, end_s)}] in the form of
transformers' ASR pipeline: each piece's share of the text and where in the input it was heard (the span of its
voiced audio to 5 ms, or the piece itself without audio). The LLM gives no word timings, so
`return_timestamps="word"` is refused.

No speech. An input, or a piece, with less than MIN_SPEECH_SECONDS (0.2 s) of 20-ms frames whose RMS level reaches
`vad_threshold_db` (default -50 dBFS, i.e. 0.0032 of full scale) gives "" without running the model: digital
silence, room noise at -60 dBFS and clips shorter than 0.2 s give no text instead of an invented sentence. Speech
is typically -35 to -10 dBFS in such frames. `vad_threshold_db=None` turns the check off (video-only input is only
checked for length).

The batch does not matter. A clip's transcript is the same alone, at any `batch_size` and next to any other clips,
for either `audio_window` of the processor: in the trimmed window the Whisper encoder masks what lies beyond each
clip's own frames and 0.5 s of silence (see `LlamaAVSRWhisperEncoder`); the full window is the same 30 s for all.

Checked at the door. Integer PCM is scaled by its type's range; NaN or infinite samples, another rank (stereo), an
empty array or another dtype raise a ValueError that names the input and says what it was, and so do video frames
that are NaN, outside 0..255, of another rank or smaller than the lip crop.

Errors. A file that cannot be read raises `MediaError` naming it. With `on_error="report"` the pipeline instead
returns {"text": None, "error": "<file>: <problem>"} for that input and transcribes the others (the CLI uses this).

Decoding: the model's generation config (greedy, `max_new_tokens=64`), overridden by any generate() argument given to
the pipeline at construction or per call (`max_new_tokens`, `num_beams`, ...; or `generate_kwargs={...}`).
"""

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import soxr
import torch
from torch.utils.data import DataLoader
from transformers import GenerationConfig
from transformers.pipelines.base import ChunkPipeline
from transformers.pipelines.pt_utils import PipelineChunkIterator, PipelineIterator, PipelinePackIterator

from .configuration_llama_avsr import MAX_AUDIO_SECONDS, SAMPLING_RATE, VIDEO_FPS, LlamaAVSRConfig
from .processing_llama_avsr import as_float_audio, as_video_frames

logger = logging.getLogger(__name__)

TASK = "audio-visual-speech-recognition"
SAMPLES_PER_FRAME = SAMPLING_RATE // VIDEO_FPS  # 640: one video frame of audio
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au"}
GENERATION_KEYS = {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}
DEFAULT_CHUNK_SECONDS = 10.0  # when the processor does not record how long its training clips were
CHUNK_MARGIN_SECONDS = 0.5  # the default chunk: the longest training clip and this much room for pauses
LONG_CHUNK_FACTOR = 1.5  # a piece this many times longer than the longest training clip gets a warning
CUT_CONTEXT_FRAMES = 2  # a cut's quietness: the energy of this many 40-ms frames on each side of it
VAD_FRAME_SAMPLES = SAMPLING_RATE // 50  # 20 ms
VAD_THRESHOLD_DB = -50.0  # dBFS: RMS level of a 20-ms frame that counts as voiced
EDGE_WINDOW_SAMPLES = SAMPLING_RATE // 200  # 5 ms: the voiced span's edges are placed to this, within a 20-ms frame
MIN_SPEECH_SECONDS = 0.2  # at least this much voiced audio (or video, without audio) to transcribe
MIN_PIECE_SECONDS = 1.0  # a long input is not cut at a pause that would leave a shorter piece


class MediaInputError(ValueError):
    """An input that cannot be used; the message starts with the file (or input) it is about."""


def _media() -> dict:
    """The package's hardened readers. This module is also copied flat next to Hub checkpoints for trust_remote_code
    users; there only arrays can be passed (a subpackage cannot be copied flat), and a path says so."""
    try:
        from modeling_llama_avsr.data import loading
    except ImportError as e:
        raise ImportError(
            "Reading audio/video files needs the llama-avsr package (pip install llama-avsr); without it, pass "
            "16 kHz audio arrays and 25 fps mouth-frame arrays instead of paths."
        ) from e
    names = ("MediaError", "read_audio", "read_video", "align_audio_to_video", "probe_media")
    return {name: getattr(loading, name) for name in names}


def _audio_source(path: Path) -> Path:
    """Where a clip's audio is: the file itself, or for a video without an audio track the 16 kHz wav next to it
    (the auto_avsr / synthetic-corpus layout). Otherwise the file itself, whose reader then names the problem."""
    if path.suffix.lower() in AUDIO_SUFFIXES or not path.is_file():
        return path
    try:
        has_audio = _media()["probe_media"](path).has_audio
    except ValueError:
        return path
    sibling = path.with_suffix(".wav")
    if not has_audio and sibling.is_file():
        logger.info("%s has no audio track: using %s", path, sibling)
        return sibling
    return path


def voiced_frames(audio: np.ndarray, threshold_db: float = VAD_THRESHOLD_DB,
                  frame_samples: int = VAD_FRAME_SAMPLES) -> np.ndarray:
    """One bool per whole frame (default 20 ms) of 16 kHz `audio`: does its RMS level reach `threshold_db` dBFS?"""
    usable = len(audio) // frame_samples * frame_samples
    frames = audio[:usable].reshape(-1, frame_samples).astype(np.float64)
    return np.sqrt(np.mean(frames**2, axis=1)) >= 10.0 ** (threshold_db / 20.0)


def refine_voiced_span(audio: np.ndarray, first: int, last: int, threshold_db: float = VAD_THRESHOLD_DB) -> tuple:
    """(start, end) in samples of the voiced span whose first and last voiced 20-ms frames are `first` and `last`,
    to 5 ms: the first and last 5-ms window at or above `threshold_db` within one frame around each edge. A frame
    that a voice onset straddles can stay below the threshold, so frame edges alone can cut up to 20 ms of speech."""
    lo = max(0, first - 1) * VAD_FRAME_SAMPLES
    loud = np.flatnonzero(voiced_frames(audio[lo : (last + 2) * VAD_FRAME_SAMPLES], threshold_db, EDGE_WINDOW_SAMPLES))
    return lo + int(loud[0]) * EDGE_WINDOW_SAMPLES, lo + (int(loud[-1]) + 1) * EDGE_WINDOW_SAMPLES


def chunk_boundaries(num_frames: int, audio: np.ndarray | None, chunk_frames: int, search_frames: int,
                     min_frames: int = 1, pause_db: float = VAD_THRESHOLD_DB) -> list:
    """[(start, end)] in video frames covering [0, num_frames), each at most `chunk_frames` long (the policy above).

    An input longer than `chunk_frames` is cut at its pauses, with audio: each piece ends in the middle of the
    longest pause (40-ms frames below `pause_db` dBFS on both sides of the cut) within its reach that leaves it, and
    what follows, at least `min_frames` long, the earliest of equally long ones; without a pause, a piece that must
    end ends at the quietest cut (the mean power of the frames around it) in the last `search_frames`."""
    if num_frames <= chunk_frames:
        return [(0, num_frames)]
    silent = power = None
    if audio is not None:
        usable = min(len(audio) // SAMPLES_PER_FRAME, num_frames)
        frames = audio[: usable * SAMPLES_PER_FRAME].reshape(usable, SAMPLES_PER_FRAME).astype(np.float64)
        power = np.concatenate([np.mean(frames**2, axis=1), np.zeros(num_frames - usable)])
        silent = power < 10.0 ** (pause_db / 10.0)
    bounds, start = [], 0
    while start < num_frames:
        must_cut = num_frames - start > chunk_frames
        end = min(start + chunk_frames, num_frames)
        pause = None
        if silent is not None and not silent[start:end].all():
            # Not in the pause this piece starts in: only after its first sound.
            sound = start + int(np.argmin(silent[start:end]))
            pause = _pause_cut(silent, max(start + min_frames, sound + 1), min(end, num_frames - min_frames))
        if pause is not None:
            end = pause
        elif must_cut and power is not None and search_frames > 0:
            cuts = np.arange(max(start + 1, end - search_frames), end + 1)
            # Quietness of a cut: the mean power of the frames around it, so that a pause beats a stop closure.
            energy = np.array([power[max(0, c - CUT_CONTEXT_FRAMES) : c + CUT_CONTEXT_FRAMES].mean() for c in cuts])
            end = int(cuts[len(cuts) - 1 - int(np.argmin(energy[::-1]))])  # ties go to the latest
        bounds.append((start, end))
        start = end
    return bounds


def _pause_cut(silent: np.ndarray, lo: int, hi: int) -> int | None:
    """The middle of the longest run of cuts in [lo, hi] with silent frames on both sides (the earliest of equal
    runs), or None. A cut c lies between frames c - 1 and c."""
    quiet = np.array([silent[c - 1] and silent[c] for c in range(lo, min(hi, len(silent) - 1) + 1)], dtype=bool)
    if not quiet.any():
        return None
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2]))  # [first, last + 1) of each run of quiet cuts
    first, stop = max(runs, key=lambda run: (run[1] - run[0], -run[0]))
    return int(lo + (first + stop - 1) // 2)


def merge_overlapping(texts: list, overlapping: bool = True) -> list:
    """Words of consecutive pieces' texts -> [(word, piece index)]; with `overlapping`, each overlap kept once.

    The overlap is the alignment of the earlier text's tail with the later text's head that matches most words
    (at the same positions; ties to the shorter); its left half is taken from the earlier piece and its right half
    from the later, as the edge words of a piece are the ones cut through. No matching word: nothing is dropped."""
    merged = []
    for index, text in enumerate(texts):
        words = text.split()
        best, best_matches = 0, 0
        tail = [w for w, _ in merged] if overlapping else []
        for n in range(1, min(len(tail), len(words)) + 1):
            matches = sum(a == b for a, b in zip(tail[-n:], words[:n]))
            if 2 * matches >= n and matches > best_matches:
                best, best_matches = n, matches
        keep = math.ceil(best / 2)
        merged = merged[: len(merged) - best + keep] + [(w, index) for w in words[keep:]]
    return merged


class AudioVisualSpeechRecognitionPipeline(ChunkPipeline):
    """Transcribe audio, mouth video or both with a `LlamaAVSRForConditionalGeneration` and its processor.

    Call arguments (also accepted at construction): `chunk_length_s` (float, default: the longest training clip,
    at most 30 when the model hears audio), `stride_length_s` (float or (left, right), default 0),
    `boundary_search_s` (float, default 5), `return_timestamps` (bool), `vad_threshold_db` (float or None,
    default -50), `on_error` ("raise" or "report"), `generate_kwargs` (dict) and any generate() argument.
    Returns {"text": str} per input (plus "chunks" / "error" as asked); `return_chunks` is the old name of
    `return_timestamps`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False
    _load_video_processor = False
    _pipeline_calls_generate = True

    def __init__(self, *args, **kwargs):
        dtype = kwargs.get("dtype")
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"The {TASK!r} pipeline needs processor=LlamaAVSRProcessor (saved with the model).")
        config = self.model.config
        for name in ("modality", "audio_compression_rate", "video_compression_rate"):
            if getattr(self.processor, name) != getattr(config, name):
                raise ValueError(
                    f"processor.{name}={getattr(self.processor, name)!r} but model.config.{name}="
                    f"{getattr(config, name)!r}: load both from the same checkpoint."
                )
        # A model passed as an object ignores pipeline(dtype=...) in transformers; honour it here.
        if isinstance(dtype, torch.dtype) and self.model.dtype != dtype:
            self.model.to(dtype)

    @property
    def uses_audio(self) -> bool:
        return self.processor.uses_audio

    @property
    def uses_video(self) -> bool:
        return self.processor.uses_video

    @property
    def longest_training_clip(self) -> float | None:
        seconds = getattr(self.processor, "training_clip_seconds", None)
        return seconds[1] if seconds else None

    @property
    def default_chunk_length_s(self) -> float:
        """The longest training clip (recorded by the processor) and CHUNK_MARGIN_SECONDS for the pauses around an
        utterance that long, else DEFAULT_CHUNK_SECONDS; at most 30 s."""
        longest = self.longest_training_clip
        return min(longest + CHUNK_MARGIN_SECONDS if longest else DEFAULT_CHUNK_SECONDS, MAX_AUDIO_SECONDS)

    def _sanitize_parameters(
        self,
        chunk_length_s=None,
        stride_length_s=None,
        boundary_search_s=None,
        on_error=None,
        return_timestamps=None,
        return_chunks=None,
        vad_threshold_db=...,
        generate_kwargs=None,
        **kwargs,
    ):
        preprocess, forward, postprocess = {}, {}, {}
        if chunk_length_s is not None:
            if not chunk_length_s > 0:
                raise ValueError(f"chunk_length_s must be positive, got {chunk_length_s}")
            if self.processor is not None and self.uses_audio and chunk_length_s > MAX_AUDIO_SECONDS:
                raise ValueError(f"chunk_length_s is at most {MAX_AUDIO_SECONDS:g} s (Whisper's window)")
            preprocess["chunk_length_s"] = chunk_length_s
        if stride_length_s is not None:
            stride = tuple(stride_length_s) if isinstance(stride_length_s, (tuple, list)) else (stride_length_s,) * 2
            if len(stride) != 2 or not all(x >= 0 for x in stride):
                raise ValueError(f"stride_length_s must be seconds >= 0 or (left, right), got {stride_length_s!r}")
            preprocess["stride_length_s"] = stride
        if boundary_search_s is not None:
            if boundary_search_s < 0:
                raise ValueError(f"boundary_search_s must be >= 0, got {boundary_search_s}")
            preprocess["boundary_search_s"] = boundary_search_s
        if on_error is not None:
            if on_error not in ("raise", "report"):
                raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
            preprocess["on_error"] = on_error
        if vad_threshold_db is not ...:
            preprocess["vad_threshold_db"] = vad_threshold_db
        if return_timestamps is None:
            return_timestamps = return_chunks
        if return_timestamps is not None:
            if return_timestamps not in (True, False):
                raise ValueError(
                    f"return_timestamps={return_timestamps!r} is not available: the LLM decoder gives no word or "
                    "character timings. return_timestamps=True gives each piece's text and time span (set their "
                    "length with chunk_length_s)."
                )
            postprocess["return_timestamps"] = return_timestamps
        unknown = set(kwargs) - GENERATION_KEYS
        if unknown:
            raise TypeError(f"Unknown arguments for the {TASK!r} pipeline: {sorted(unknown)}")
        generate_kwargs = {**(generate_kwargs or {}), **kwargs}
        if generate_kwargs:
            forward["generate_kwargs"] = generate_kwargs
        return preprocess, forward, postprocess

    # ---- inputs --------------------------------------------------------------------------------------------------

    def _read(self, inputs):
        """Input -> (audio 16 kHz float32 or None, video (T, H, W[, C]) or None, source name)."""
        if isinstance(inputs, (str, Path)):
            path = Path(inputs)
            if path.suffix.lower() in AUDIO_SUFFIXES:
                return self._read_parts(audio=path, video=None, source=str(path))
            return self._read_parts(audio=path if self.uses_audio else None, video=path, source=str(path))
        if isinstance(inputs, np.ndarray):
            # Up to 2-D is audio (a 2-D array is then refused as not mono); frames are 3-D or 4-D.
            if inputs.ndim <= 2 and self.uses_audio:
                return self._read_parts(audio=inputs, video=None, source="<audio array>")
            return self._read_parts(audio=None, video=inputs, source="<video array>")
        if isinstance(inputs, dict):
            audio = next((inputs[k] for k in ("audio", "raw", "array") if inputs.get(k) is not None), None)
            video = inputs.get("video")
            named = [str(x) for x in (video, audio) if isinstance(x, (str, Path))]
            source = str(inputs.get("source") or (named[0] if named else "<dict input>"))
            return self._read_parts(audio, video, source, inputs.get("sampling_rate", SAMPLING_RATE))
        raise TypeError(
            f"{TASK} inputs are paths, numpy arrays or dicts with 'audio'/'video'; got {type(inputs).__name__}"
        )

    def _read_parts(self, audio, video, source, sampling_rate=SAMPLING_RATE):
        modality = self.processor.modality.upper()
        if self.uses_audio and audio is None:
            raise MediaInputError(f"{source}: the {modality} model needs audio; give an audio file, a video with an "
                                  "audio track, or {'audio': ..., 'video': ...}")
        if self.uses_video and video is None:
            raise MediaInputError(f"{source}: the {modality} model needs mouth video; give a video file or "
                                  "{'audio': ..., 'video': ...}")
        samples = frames = None
        size = self.processor.video_crop_size
        if self.uses_video:
            if isinstance(video, (str, Path)):
                frames = _media()["read_video"](video, max_seconds=None, min_size=size)
            else:
                try:
                    frames = as_video_frames(video, "video", size)
                except ValueError as e:
                    raise MediaInputError(f"{source}: {e}; the pipeline expects mouth-region frames") from None
        if self.uses_audio:
            if isinstance(audio, (str, Path)):
                audio_path = _audio_source(Path(audio))
                samples = _media()["read_audio"](audio_path, max_seconds=None)
                if frames is not None and isinstance(video, (str, Path)):
                    # As the training data is read: the video is the clock, the audio is cut or padded to it.
                    samples = _media()["align_audio_to_video"](samples, len(frames), audio_path)
            else:
                try:
                    samples = as_float_audio(audio, "audio")
                except ValueError as e:
                    raise MediaInputError(f"{source}: {e}") from None
                if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float)) or sampling_rate <= 0:
                    raise MediaInputError(f"{source}: sampling_rate must be a positive number, got {sampling_rate!r}")
                if sampling_rate != SAMPLING_RATE:
                    samples = soxr.resample(samples, sampling_rate, SAMPLING_RATE, quality="VHQ")
                    if samples.size == 0:
                        raise MediaInputError(f"{source}: audio holds no samples at {SAMPLING_RATE} Hz")
        return samples, frames, source

    def _has_speech(self, audio, video, vad_threshold_db) -> tuple:
        """(enough speech to transcribe?, (first, last) voiced second or None) for one piece, as documented above."""
        if audio is None or vad_threshold_db is None:
            seconds = len(audio) / SAMPLING_RATE if audio is not None else len(video) / VIDEO_FPS
            return seconds >= MIN_SPEECH_SECONDS, None
        voiced = voiced_frames(audio, vad_threshold_db)
        if voiced.sum() * VAD_FRAME_SAMPLES / SAMPLING_RATE < MIN_SPEECH_SECONDS:
            return False, None
        where = np.flatnonzero(voiced)
        start, end = refine_voiced_span(audio, int(where[0]), int(where[-1]), vad_threshold_db)
        return True, (start / SAMPLING_RATE, end / SAMPLING_RATE)

    def preprocess(self, inputs, chunk_length_s=None, stride_length_s=(0.0, 0.0), boundary_search_s=5.0,
                   on_error="raise", vad_threshold_db=VAD_THRESHOLD_DB):
        try:
            audio, video, source = self._read(inputs)
        except Exception as e:
            if on_error == "raise" or not _is_media_problem(e):
                raise
            yield {"error": str(e), "source": _describe(inputs), "start": None, "end": None, "is_last": True,
                   "overlap": False}
            return
        chunk_length_s = chunk_length_s or self.default_chunk_length_s
        num_frames = len(video) if video is not None else -(-len(audio) // SAMPLES_PER_FRAME)
        left, right = (int(round(x * VIDEO_FPS)) for x in stride_length_s)
        chunk_frames = int(chunk_length_s * VIDEO_FPS)
        if num_frames > chunk_frames and left + right >= chunk_frames:
            raise ValueError(f"stride_length_s {stride_length_s} leaves nothing of a {chunk_length_s:g}-s chunk: "
                             "the two strides together must be shorter than chunk_length_s")
        core_frames = chunk_frames - left - right
        search_frames = int(min(boundary_search_s, core_frames / VIDEO_FPS / 2) * VIDEO_FPS)
        bounds = chunk_boundaries(num_frames, audio, chunk_frames if num_frames <= chunk_frames else core_frames,
                                  search_frames, min_frames=int(MIN_PIECE_SECONDS * VIDEO_FPS),
                                  pause_db=VAD_THRESHOLD_DB if vad_threshold_db is None else vad_threshold_db)
        if len(bounds) > 1:
            logger.info("%s: %.1f s split into %d chunks of at most %g s", source, num_frames / VIDEO_FPS,
                        len(bounds), chunk_length_s)
        longest = self.longest_training_clip
        warned = False
        for i, (start, end) in enumerate(bounds):
            whole = len(bounds) == 1  # never touch an uncut input, so its samples are exactly the file's
            first, last = (0, num_frames) if whole else (max(0, start - left), min(num_frames, end + right))
            item = {"source": source, "error": None, "start": start / VIDEO_FPS, "end": end / VIDEO_FPS,
                    "is_last": i == len(bounds) - 1, "overlap": not whole and left + right > 0}
            if audio is not None:
                item["audio"] = audio if whole else audio[first * SAMPLES_PER_FRAME : last * SAMPLES_PER_FRAME]
            if video is not None:
                item["video"] = video if whole else video[first:last]
            seconds = (last - first) / VIDEO_FPS
            if longest and seconds > LONG_CHUNK_FACTOR * longest and not warned:
                logger.warning("%s: transcribing %.1f s at once, but the model was trained on clips of at most "
                               "%.1f s; expect lost or invented words (lower chunk_length_s)", source, seconds, longest)
                warned = True
            speech, voiced = self._has_speech(item.get("audio"), item.get("video"), vad_threshold_db)
            item["speech"] = speech
            if voiced is not None:  # the voiced span within this piece's own stretch of the input
                offset = first / VIDEO_FPS
                item["start"] = round(max(item["start"], offset + voiced[0]), 3)
                item["end"] = round(max(item["start"], min(item["end"], offset + voiced[1])), 3)
                if not whole and not item["overlap"]:
                    self._trim_to_voiced(item, voiced)
            yield item

    @staticmethod
    def _trim_to_voiced(item, voiced):
        """A cut piece holds up to half a pause of silence on each side, but training clips begin and end within a
        few ms of their first and last sound (the corpus, like LRS3's utterance clips, is trimmed), and a model trained
        on them misreads the first word after leading silence: a fresh main-job model read "bin blue in y six now" as
        "a blue box is beside the bottle" with 0.15 s of silence before it (11.7 % WER on a recording of 30 clips
        with 0.3-s pauses, 2.0 % one by one). So a cut piece without strides is trimmed to its voiced span: on
        video-frame boundaries when it has video (audio and video stay aligned), else to the 5-ms edges of
        `refine_voiced_span`: on the 20-ms frame grid a piece could lose up to 20 ms of its first or last sound, and
        that cost words too (5.6 % against 2.0 % on the test's recording; 3.0 % with 5-ms edges)."""
        if item.get("video") is not None:
            lo, hi = int(math.floor(voiced[0] * VIDEO_FPS)), int(math.ceil(voiced[1] * VIDEO_FPS))
            item["video"] = item["video"][lo:hi]
            if item.get("audio") is not None:
                item["audio"] = item["audio"][lo * SAMPLES_PER_FRAME : hi * SAMPLES_PER_FRAME]
        elif item.get("audio") is not None:
            item["audio"] = item["audio"][int(round(voiced[0] * SAMPLING_RATE)) : int(round(voiced[1] * SAMPLING_RATE))]

    # ---- model ---------------------------------------------------------------------------------------------------

    def _forward(self, model_inputs, generate_kwargs=None):
        batched = "items" in model_inputs
        items = model_inputs["items"] if batched else [model_inputs]
        texts = [None if item["error"] is not None else "" for item in items]
        valid = [i for i, item in enumerate(items) if item["error"] is None and item["speech"]]
        if valid:
            batch = self.processor(
                audio=[items[i]["audio"] for i in valid] if self.uses_audio else None,
                videos=[items[i]["video"] for i in valid] if self.uses_video else None,
            ).to(self.device)
            generated = self.model.generate(**batch, **self._prepare_generate_kwargs(generate_kwargs or {}))
            decoded = self.processor.batch_decode(generated[:, batch["input_ids"].shape[1] :])
            for i, text in zip(valid, decoded):
                texts[i] = text
        outputs = {"text": texts}
        for key in ("error", "source", "start", "end", "is_last", "overlap"):
            outputs[key] = [item[key] for item in items]
        return outputs if batched else {key: value[0] for key, value in outputs.items()}

    def postprocess(self, model_outputs, return_timestamps=False):
        errors = [out["error"] for out in model_outputs if out["error"] is not None]
        if errors:
            return {"text": None, "error": errors[0]}
        words = merge_overlapping([out["text"] for out in model_outputs], model_outputs[0]["overlap"])
        result = {"text": " ".join(word for word, _ in words)}
        if return_timestamps:
            result["chunks"] = [
                {"text": " ".join(w for w, owner in words if owner == i), "timestamp": (out["start"], out["end"])}
                for i, out in enumerate(model_outputs)
                if any(owner == i for _, owner in words)
            ]
        return result

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        # As ChunkPipeline, but batches are raw chunks that `_forward` hands to the processor together: the
        # processor, not a generic tensor padder, knows how to pad log-mel, frames and placeholder sequences.
        # Decoding stays in this process (num_workers is ignored): media readers are not fork-safe.
        if num_workers:
            logger.info("%s reads media in the main process; num_workers=%d is ignored", TASK, num_workers)
        dataset = PipelineChunkIterator(inputs, self.preprocess, preprocess_params)
        collate = (lambda items: items[0]) if batch_size == 1 else (lambda items: {"items": items})
        loader = DataLoader(dataset, num_workers=0, batch_size=batch_size, collate_fn=collate)
        packed = PipelinePackIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(packed, self.postprocess, postprocess_params)


def _is_media_problem(error: Exception) -> bool:
    try:
        media_error = _media()["MediaError"]
    except ImportError:
        media_error = MediaInputError
    return isinstance(error, (media_error, MediaInputError))


def _describe(inputs) -> str:
    if isinstance(inputs, (str, Path)):
        return str(inputs)
    if isinstance(inputs, dict):
        return str(inputs.get("source") or inputs.get("video") or inputs.get("audio"))[:200]
    return f"<{type(inputs).__name__}>"


WRONG_TASK = (
    "{name} is a Llama-AVSR model: transcribe with pipeline(\"audio-visual-speech-recognition\", model=...) "
    "after `import modeling_llama_avsr` (it serves ASR, VSR and AVSR models alike), or `llama-avsr transcribe`. "
    "transformers' \"automatic-speech-recognition\" pipeline drives CTC and encoder-decoder models only."
)


class _WrongTaskForSpeechSeq2Seq:
    """What AutoModelForSpeechSeq2Seq finds for a LlamaAVSRConfig: transformers' "automatic-speech-recognition"
    pipeline loads a folder with it (after the CTC classes), and gets this error naming the task that works, instead
    of "Unrecognized configuration class" for each class it tried. Nothing else is ever built from it."""

    config_class = LlamaAVSRConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        raise ValueError(WRONG_TASK.format(name=pretrained_model_name_or_path))

    @classmethod
    def from_config(cls, config, **kwargs):
        raise ValueError(WRONG_TASK.format(name="This configuration"))

    _from_config = from_config


def register_pipeline():
    """Register the task with transformers (done when `modeling_llama_avsr` is imported)."""
    from transformers import AutoModelForSpeechSeq2Seq
    from transformers.pipelines import PIPELINE_REGISTRY

    from .modeling_llama_avsr import LlamaAVSRForConditionalGeneration

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=AudioVisualSpeechRecognitionPipeline,
        pt_model=LlamaAVSRForConditionalGeneration,
        type="multimodal",
    )
    AutoModelForSpeechSeq2Seq.register(LlamaAVSRConfig, _WrongTaskForSpeechSeq2Seq, exist_ok=True)


# ---- command line: `llama-avsr transcribe` ---------------------------------------------------------------------


def add_transcribe_arguments(parser):
    parser.add_argument("files", nargs="+", help="media files: mp4 (with audio for ASR/AVSR), wav, flac, ...")
    parser.add_argument("--model", required=True, help="a saved model folder (full or light) or Hub id")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks decoded together")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the first GPU, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights and activations dtype (default: as saved)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--chunk-length", type=float, default=None,
                        help="inputs longer than this many seconds are split (default: the longest training clip)")
    parser.add_argument("--stride-length", type=float, default=None,
                        help="seconds of overlap added on each side of every piece of a split input")
    parser.add_argument("--timestamps", action="store_true",
                        help="also give each piece's time span (JSON: 'chunks'; text: FILE START END TEXT lines)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model folder's own code (Hub checkpoints without this package's version)")


def build_pipeline(model, device=None, dtype=None, trust_remote_code=False, **kwargs):
    """The pipeline for a saved folder or Hub id, loaded with this package's classes (so Hub folders that also carry
    remote code need no trust_remote_code here)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    return AudioVisualSpeechRecognitionPipeline(model=loaded.eval(), processor=processor, device=device, **kwargs)


def check_device(device: str | None):
    """Refuse a device this torch build cannot use, with the reason (instead of an assertion deep in torch)."""
    if device is None:
        return
    try:
        where = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device: {e}") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({reason}); use --device cpu")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu")


def _check_transcribe_arguments(args):
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--num-beams", args.num_beams)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.chunk_length is not None and not 0 < args.chunk_length <= MAX_AUDIO_SECONDS:
        raise ValueError(f"--chunk-length must be in (0, {MAX_AUDIO_SECONDS:g}] seconds, got {args.chunk_length:g}")
    if args.stride_length is not None and args.stride_length < 0:
        raise ValueError(f"--stride-length must be >= 0 seconds, got {args.stride_length:g}")
    check_device(args.device)
    local = Path(args.model).expanduser()
    if not local.exists() and (local.is_absolute() or args.model.startswith(".") or args.model.count("/") > 1):
        raise ValueError(f"--model {args.model}: no such folder")
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"--model {args.model}: not a saved model folder (it has no config.json)")


def run_transcribe(args) -> int:
    """Transcribe `args.files`; prints "FILE<TAB>TEXT" (or JSON lines). Unreadable files are reported on stderr and
    skipped; the exit status is 1 if any file failed. A usage error (bad flag value, missing or unloadable model,
    unusable device) is one line on stderr and exit status 2: no traceback (run with -v for it)."""
    try:
        _check_transcribe_arguments(args)
        pipe = build_pipeline(args.model, device=args.device, dtype=args.dtype,
                              trust_remote_code=args.trust_remote_code)
        return _transcribe_files(pipe, args)
    except (OSError, ValueError) as e:
        logger.debug("transcribe failed", exc_info=True)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llama-avsr transcribe: error: {first_line}", file=sys.stderr, flush=True)
        return 2


def _transcribe_files(pipe, args) -> int:
    from tqdm.auto import tqdm

    generate = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v}
    options = {k: v for k, v in (("chunk_length_s", args.chunk_length), ("stride_length_s", args.stride_length))
               if v is not None}
    results = pipe((f for f in args.files), batch_size=args.batch_size, on_error="report",
                   return_timestamps=args.timestamps, **options, **generate)
    failed = 0
    for path, result in tqdm(zip(args.files, results), total=len(args.files), unit="file", file=sys.stderr):
        if result.get("error"):
            failed += 1
            tqdm.write(f"error: {result['error']}", file=sys.stderr)
        if args.json:
            line = {"file": path, "text": result["text"], "error": result.get("error")}
            if args.timestamps:
                line["chunks"] = result.get("chunks")
            print(json.dumps(line), flush=True)
        elif not result.get("error"):
            if args.timestamps:
                for chunk in result["chunks"]:
                    start, end = chunk["timestamp"]
                    print(f"{path}\t{start:.2f}\t{end:.2f}\t{chunk['text']}", flush=True)
            else:
                print(f"{path}\t{result['text']}", flush=True)
    if failed:
        logger.error("%d of %d files could not be transcribed", failed, len(args.files))
    return 1 if failed else 0


__all__ = [
    "AudioVisualSpeechRecognitionPipeline",
    "MediaInputError",
    "WRONG_TASK",
    "add_transcribe_arguments",
    "build_pipeline",
    "check_device",
    "chunk_boundaries",
    "merge_overlapping",
    "register_pipeline",
    "run_transcribe",
]
