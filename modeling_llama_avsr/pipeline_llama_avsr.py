"""The "audio-visual-speech-recognition" pipeline: media in, transcript out.

    from transformers import pipeline
    import modeling_llama_avsr  # registers the task

    asr = pipeline("audio-visual-speech-recognition", model="outputs/run1/final")
    asr("clip.mp4")                                   # {"text": "..."}
    asr(["a.mp4", "b.wav"], batch_size=8, max_new_tokens=32, num_beams=4)

What an input may be, depending on the model's modality (ASR needs audio, VSR video, AVSR both):
- a path: an audio file (wav, flac, ogg, mp3: ASR) or a video (mp4, mkv, avi, mov, webm), whose frames are the mouth
  region of interest (VSR, AVSR) and whose audio track feeds ASR and AVSR;
- a 1-D float array: 16 kHz mono audio; a (T, H, W[, C]) uint8 array: mouth frames at 25 fps;
- a dict with "audio" and/or "video" (each a path or an array) and optionally "sampling_rate" for an audio array;
  transformers' ASR form {"raw" or "array": samples, "sampling_rate": sr} is accepted too.

Long inputs. Whisper sees at most 30 s, and the model was trained on short utterances, so an input longer than
`chunk_length_s` (default 30 s) is split, each piece is transcribed on its own and the texts are joined with spaces.
Cuts fall on video-frame boundaries (40 ms), so audio and video are cut at the same instant. With audio, each cut is
placed at the quietest 40-ms frame (lowest RMS) within the last `boundary_search_s` seconds (default 5 s) before
the chunk limit, so cuts tend to fall in pauses rather than inside words; video-only input is cut at fixed
`chunk_length_s` intervals. A word that straddles a cut can still be lost or split. An input no longer than
`chunk_length_s` is never cut, so short clips give exactly what `model.generate` gives on the processor's output.

Errors. A file that cannot be read raises `MediaError` naming it. With `on_error="report"` the pipeline instead
returns {"text": None, "error": "<file>: <problem>"} for that input and transcribes the others (the CLI uses this).

Decoding: the model's generation config (greedy, `max_new_tokens=64`), overridden by any generate() argument given to
the pipeline at construction or per call (`max_new_tokens`, `num_beams`, ...; or `generate_kwargs={...}`).
"""

import logging
from pathlib import Path

import numpy as np
import soxr
import torch
from torch.utils.data import DataLoader
from transformers import GenerationConfig
from transformers.pipelines.base import ChunkPipeline
from transformers.pipelines.pt_utils import PipelineChunkIterator, PipelineIterator, PipelinePackIterator

from .configuration_llama_avsr import MAX_AUDIO_SECONDS, SAMPLING_RATE, VIDEO_FPS

logger = logging.getLogger(__name__)

TASK = "audio-visual-speech-recognition"
SAMPLES_PER_FRAME = SAMPLING_RATE // VIDEO_FPS  # 640: one video frame of audio
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".au"}
GENERATION_KEYS = {key for key in vars(GenerationConfig()) if not key.startswith("_")} | {"generation_config"}


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


def chunk_boundaries(num_frames: int, audio: np.ndarray | None, chunk_frames: int, search_frames: int) -> list:
    """[(start, end)] in video frames covering [0, num_frames), each at most `chunk_frames` long (the policy above)."""
    bounds, start = [], 0
    while num_frames - start > chunk_frames:
        end = start + chunk_frames
        if audio is not None and search_frames > 0:
            lo = max(start + 1, end - search_frames)
            frames = audio[lo * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME]
            usable = len(frames) // SAMPLES_PER_FRAME
            if usable > 0:
                energy = np.sqrt(np.mean(frames[: usable * SAMPLES_PER_FRAME].reshape(usable, -1) ** 2, axis=1))
                # Cut after the quietest frame; ties go to the latest, keeping chunks long.
                end = lo + usable - int(np.argmin(energy[::-1]))
        bounds.append((start, end))
        start = end
    bounds.append((start, num_frames))
    return bounds


class AudioVisualSpeechRecognitionPipeline(ChunkPipeline):
    """Transcribe audio, mouth video or both with a `LlamaAVSRForConditionalGeneration` and its processor.

    Call arguments (also accepted at construction): `chunk_length_s` (float, default 30, at most 30 when the model
    hears audio), `boundary_search_s` (float, default 5), `on_error` ("raise" or "report"), `return_chunks` (bool:
    add {"text", "timestamp": (start_s, end_s)} per piece), `generate_kwargs` (dict) and any generate() argument.
    Returns {"text": str} per input (plus "chunks" / "error" as asked).
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

    def _sanitize_parameters(
        self,
        chunk_length_s=None,
        boundary_search_s=None,
        on_error=None,
        return_chunks=None,
        generate_kwargs=None,
        **kwargs,
    ):
        preprocess, forward, postprocess = {}, {}, {}
        if chunk_length_s is not None:
            if chunk_length_s <= 0:
                raise ValueError(f"chunk_length_s must be positive, got {chunk_length_s}")
            if self.processor is not None and self.uses_audio and chunk_length_s > MAX_AUDIO_SECONDS:
                raise ValueError(f"chunk_length_s is at most {MAX_AUDIO_SECONDS:g} s (Whisper's window)")
            preprocess["chunk_length_s"] = chunk_length_s
        if boundary_search_s is not None:
            preprocess["boundary_search_s"] = boundary_search_s
        if on_error is not None:
            if on_error not in ("raise", "report"):
                raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
            preprocess["on_error"] = on_error
        if return_chunks is not None:
            postprocess["return_chunks"] = return_chunks
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
            if inputs.ndim == 1:
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
                frames = np.asarray(video)
                if frames.ndim not in (3, 4) or frames.shape[0] == 0:
                    raise MediaInputError(f"{source}: video must be (T, H, W[, C]) frames, got shape {frames.shape}")
                if min(frames.shape[1:3]) < size:
                    raise MediaInputError(f"{source}: frames are {frames.shape[1]}x{frames.shape[2]}, smaller than "
                                          f"the {size}x{size} mouth crop; the pipeline expects mouth-region video")
        if self.uses_audio:
            if isinstance(audio, (str, Path)):
                audio_path = _audio_source(Path(audio))
                samples = _media()["read_audio"](audio_path, max_seconds=None)
                if frames is not None and isinstance(video, (str, Path)):
                    # As the training data is read: the video is the clock, the audio is cut or padded to it.
                    samples = _media()["align_audio_to_video"](samples, len(frames), audio_path)
            else:
                samples = np.asarray(audio, dtype=np.float32)
                if samples.ndim != 1:
                    raise MediaInputError(f"{source}: audio must be 1-D mono samples, got shape {samples.shape}")
                if sampling_rate != SAMPLING_RATE:
                    samples = soxr.resample(samples, sampling_rate, SAMPLING_RATE, quality="VHQ")
                if samples.size == 0:
                    raise MediaInputError(f"{source}: audio holds no samples")
                if not np.isfinite(samples).all():
                    raise MediaInputError(f"{source}: audio contains NaN or infinite samples")
        return samples, frames, source

    def preprocess(self, inputs, chunk_length_s=MAX_AUDIO_SECONDS, boundary_search_s=5.0, on_error="raise"):
        try:
            audio, video, source = self._read(inputs)
        except Exception as e:
            if on_error == "raise" or not _is_media_problem(e):
                raise
            yield {"error": str(e), "source": _describe(inputs), "start": None, "end": None, "is_last": True}
            return
        if video is not None:
            num_frames = len(video)
        else:
            num_frames = -(-len(audio) // SAMPLES_PER_FRAME)
        chunk_frames = int(chunk_length_s * VIDEO_FPS)
        search_frames = int(min(boundary_search_s, chunk_length_s / 2) * VIDEO_FPS)
        bounds = chunk_boundaries(num_frames, audio, chunk_frames, search_frames)
        if len(bounds) > 1:
            logger.info("%s: %.1f s split into %d chunks of at most %g s", source, num_frames / VIDEO_FPS,
                        len(bounds), chunk_length_s)
        for i, (start, end) in enumerate(bounds):
            item = {"source": source, "error": None, "start": start / VIDEO_FPS, "end": end / VIDEO_FPS,
                    "is_last": i == len(bounds) - 1}
            whole = len(bounds) == 1  # never touch an uncut input, so its samples are exactly the file's
            if audio is not None:
                item["audio"] = audio if whole else audio[start * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME]
            if video is not None:
                item["video"] = video if whole else video[start:end]
            yield item

    # ---- model ---------------------------------------------------------------------------------------------------

    def _forward(self, model_inputs, generate_kwargs=None):
        batched = "items" in model_inputs
        items = model_inputs["items"] if batched else [model_inputs]
        texts = [None] * len(items)
        valid = [i for i, item in enumerate(items) if item["error"] is None]
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
        for key in ("error", "source", "start", "end", "is_last"):
            outputs[key] = [item[key] for item in items]
        return outputs if batched else {key: value[0] for key, value in outputs.items()}

    def postprocess(self, model_outputs, return_chunks=False):
        errors = [out["error"] for out in model_outputs if out["error"] is not None]
        if errors:
            return {"text": None, "error": errors[0]}
        result = {"text": " ".join(out["text"] for out in model_outputs if out["text"]).strip()}
        if return_chunks:
            result["chunks"] = [{"text": out["text"], "timestamp": (out["start"], out["end"])} for out in model_outputs]
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


def register_pipeline():
    """Register the task with transformers (done when `modeling_llama_avsr` is imported)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    from .modeling_llama_avsr import LlamaAVSRForConditionalGeneration

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=AudioVisualSpeechRecognitionPipeline,
        pt_model=LlamaAVSRForConditionalGeneration,
        type="multimodal",
    )


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
    parser.add_argument("--chunk-length", type=float, default=MAX_AUDIO_SECONDS,
                        help="inputs longer than this many seconds are split (see the pipeline's policy)")
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


def run_transcribe(args) -> int:
    """Transcribe `args.files`; prints "FILE<TAB>TEXT" (or JSON lines). Unreadable files are reported on stderr and
    skipped; the exit status is 1 if any file failed."""
    import json
    import sys

    from tqdm.auto import tqdm

    generate = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v}
    pipe = build_pipeline(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    results = pipe(
        (f for f in args.files), batch_size=args.batch_size, chunk_length_s=args.chunk_length, on_error="report",
        **generate,
    )
    failed = 0
    for path, result in tqdm(zip(args.files, results), total=len(args.files), unit="file", file=sys.stderr):
        if result.get("error"):
            failed += 1
            tqdm.write(f"error: {result['error']}", file=sys.stderr)
        if args.json:
            print(json.dumps({"file": path, "text": result["text"], "error": result.get("error")}), flush=True)
        elif not result.get("error"):
            print(f"{path}\t{result['text']}", flush=True)
    if failed:
        logger.error("%d of %d files could not be transcribed", failed, len(args.files))
    return 1 if failed else 0


__all__ = [
    "AudioVisualSpeechRecognitionPipeline",
    "MediaInputError",
    "add_transcribe_arguments",
    "build_pipeline",
    "chunk_boundaries",
    "register_pipeline",
    "run_transcribe",
]
