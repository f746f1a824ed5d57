"""`llama-avsr preprocess`: raw LRS2/LRS3 face videos -> 96x96 mouth crops at 25 fps + 16 kHz wavs, auto_avsr layout.

    face mp4 --(mediapipe face mesh)--> lip and eye landmarks per frame (cached as .npz)
             --> missed frames interpolated, mouth centre smoothed over 12 frames (as auto_avsr)
             --> one scale per clip (outer eye corners -> `eye_distance` px), bilinear 96x96 crop around the centre
             --> OUT/{dataset}/{dataset}_video_seg16s/SPLIT/SPEAKER/ID.{mp4,wav} + _text_seg16s txt + labels csv

We do not warp each frame onto a mean face as auto_avsr does (that needs OpenCV): a per-clip scale and a smoothed
centre keep the crop steady; the head's in-plane rotation stays in the crop. Clips longer than `max_seconds` (16)
are cut at word boundaries using the word timings of LRS pretrain transcripts, as auto_avsr does.

Two environments. mediapipe 0.10.21 pins numpy<2 and protobuf<5, so it cannot live in the main environment. The
landmark stage therefore imports nothing but numpy, PyAV and mediapipe, and runs from this file's path:

    python3.11 -m venv ~/.venvs/landmarks && ~/.venvs/landmarks/bin/pip install "mediapipe==0.10.21" "numpy<2" av tqdm
    ~/.venvs/landmarks/bin/python modeling_llama_avsr/data/preprocess.py --stage landmarks --src LRS3 --out OUT
    llama-avsr preprocess --stage crop --src LRS3 --dataset lrs3 --split test --out OUT    # main environment

`--stage all` does both where mediapipe and this package share an environment. Both stages are resumable (finished
files are skipped; every file is written to a temporary name and renamed), run over files in parallel (`--workers`)
and show a progress bar. A file that fails is logged and listed in OUT/preprocess_failures.txt; the others go on.
"""

import argparse
import csv
import logging
import multiprocessing
import sys
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    from .atomic import atomic_path, write_bytes_atomic
    from .loading import MediaError
except ImportError:  # run as a file in the landmark environment, where the package (torch, transformers) is absent
    from atomic import atomic_path, write_bytes_atomic  # stdlib only, found beside this file

    class MediaError(ValueError):
        def __init__(self, path, problem: str):
            super().__init__(f"{path}: {problem}")
            self.path, self.problem = str(path), problem


__all__ = [
    "CropSettings",
    "add_preprocess_arguments",
    "crop_mouth",
    "detect_landmarks",
    "fill_missing",
    "frame_indices",
    "mouth_centres",
    "preprocess",
    "run_preprocess",
    "smooth_track",
    "split_at_words",
]

logger = logging.getLogger(__name__)

# Not imported from configuration_llama_avsr: the landmark stage runs this file alone in mediapipe's environment.
FPS = 25
SAMPLE_RATE = 16000
CROP_SIZE = 96
EYE_CORNERS = (33, 263)  # mediapipe face mesh: outer corners of the right and left eye
MIN_EYE_DISTANCE = 12.0  # px in the source: smaller faces are too blurred to read lips from


# ---- pure numpy: the geometry ----------------------------------------------------------------------------------------


def fill_missing(track: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """(T, ...) points with undetected frames linearly interpolated from their neighbours (held at the ends)."""
    detected = np.asarray(detected, bool)
    if not detected.any():
        raise ValueError("no frame has a detected face")
    flat = np.asarray(track, np.float64).reshape(len(track), -1)
    t = np.arange(len(flat))
    filled = np.stack([np.interp(t, t[detected], flat[detected, k]) for k in range(flat.shape[1])], axis=1)
    return filled.reshape(np.shape(track))


def smooth_track(track: np.ndarray, window: int = 12) -> np.ndarray:
    """Centred moving average over `window` frames along time; near the ends the window shrinks (no edge bias)."""
    track = np.asarray(track, np.float64)
    if window <= 1 or len(track) < 2:
        return track.copy()
    before, after = window // 2, window - 1 - window // 2
    flat = track.reshape(len(track), -1)
    padded = np.concatenate([np.zeros((1, flat.shape[1])), np.cumsum(flat, axis=0)])
    t = np.arange(len(flat))
    lo, hi = np.clip(t - before, 0, len(flat)), np.clip(t + after + 1, 0, len(flat))
    return ((padded[hi] - padded[lo]) / (hi - lo)[:, None]).reshape(track.shape)


def mouth_centres(lips: np.ndarray) -> np.ndarray:
    """(T, 2) x, y centre of the lip landmarks (T, K, 2)."""
    return np.asarray(lips, np.float64).mean(axis=1)


def crop_mouth(frames: np.ndarray, centres: np.ndarray, scale: float = 1.0, size: int = CROP_SIZE) -> np.ndarray:
    """(T, size, size[, C]) crops of (T, H, W[, C]) frames, each centred on its (x, y) centre, the source magnified
    by `scale`; bilinear sampling, pixels outside the frame repeat the border."""
    frames = np.asarray(frames)
    t, h, w = frames.shape[:3]
    offsets = (np.arange(size) - (size - 1) / 2) / scale
    xs = np.asarray(centres, np.float64)[:, 0, None] + offsets[None, :]  # (T, size)
    ys = np.asarray(centres, np.float64)[:, 1, None] + offsets[None, :]
    xs, ys = np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1)
    x0, y0 = np.minimum(xs.astype(int), w - 2).clip(0), np.minimum(ys.astype(int), h - 2).clip(0)
    wx, wy = xs - x0, ys - y0
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    ti = np.arange(t)[:, None, None]
    extra = (None,) * (frames.ndim - 3)
    wx, wy = wx[:, None, :][(...,) + extra], wy[:, :, None][(...,) + extra]

    def at(yi, xi):
        return frames[ti, yi[:, :, None], xi[:, None, :]].astype(np.float32)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)


def frame_indices(num_frames: int, src_fps: float, dst_fps: float = FPS) -> np.ndarray:
    """Source frame shown at each output frame when converting the frame rate (nearest frame)."""
    if abs(src_fps - dst_fps) <= 0.01 * dst_fps:
        return np.arange(num_frames)
    count = max(1, int(round(num_frames * dst_fps / src_fps)))
    return np.minimum(np.rint(np.arange(count) * src_fps / dst_fps).astype(int), num_frames - 1)


def split_at_words(words, max_seconds: float = 16.0) -> list[tuple[float, float, str]]:
    """[(start, end, text)] segments of at most `max_seconds`, cut between words; `words` are (word, start, end)."""
    segments, current = [], []
    for word, start, end in words:
        if current and end - current[0][1] > max_seconds:
            segments.append((current[0][1], current[-1][2], " ".join(w for w, _, _ in current)))
            current = []
        current.append((word, start, end))
    if current:
        segments.append((current[0][1], current[-1][2], " ".join(w for w, _, _ in current)))
    return segments


# ---- media I/O (PyAV: present in both environments) --------------------------------------------------------------


def _open(path):
    import av

    try:
        return av.open(str(path), timeout=10.0)
    except Exception as e:
        raise MediaError(path, f"not a readable media file ({str(e).strip() or type(e).__name__})") from e


def iter_rgb_frames(path):
    """Yields the frames of a video as (H, W, 3) uint8 and returns nothing; MediaError if it has no video stream."""
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "has no video stream")
        try:
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
        except Exception as e:
            raise MediaError(path, f"cannot decode video ({str(e).strip() or type(e).__name__})") from e


def read_clip(path) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(frames (T, H, W, 3) uint8, fps, audio 16 kHz mono float32 or None when there is no audio track)."""
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or FPS)
    frames = list(iter_rgb_frames(path))
    if not frames:
        raise MediaError(path, "video holds no frames")
    audio = None
    with _open(path) as container:
        if container.streams.audio:
            # FFmpeg's resampler downmixes and resamples here: this stage must not need the package's resample
            to_16k = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            chunks = []
            try:
                for frame in container.decode(container.streams.audio[0]):
                    chunks += [f.to_ndarray().reshape(-1) for f in to_16k.resample(frame)]
                chunks += [f.to_ndarray().reshape(-1) for f in to_16k.resample(None)]
            except Exception as e:
                raise MediaError(path, f"cannot decode the audio track ({str(e).strip() or type(e).__name__})") from e
            audio = np.concatenate(chunks).astype(np.float32) if chunks else None
    return np.stack(frames), fps, audio


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS):
    """H.264 yuv420p mp4 of (T, H, W, 3) RGB frames, written to a temporary name and renamed."""
    import av

    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE):
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((np.clip(audio, -1, 1) * 32767).round().astype("<i2").tobytes())


# ---- landmarks (mediapipe) -------------------------------------------------------------------------------------------


def detect_landmarks(frames) -> dict:
    """Lip (T, 40, 2) and outer eye corner (T, 2, 2) landmarks in pixels, and `detected` (T,), for an iterable of
    RGB frames, with mediapipe's face mesh in tracking mode."""
    try:
        import mediapipe as mp
    except ImportError as e:
        raise ImportError(
            "The landmark stage needs mediapipe, which requires numpy<2: run it in its own environment "
            "(pip install 'mediapipe==0.10.21' 'numpy<2' av) with `python modeling_llama_avsr/data/preprocess.py "
            "--stage landmarks ...`; see this module's docstring"
        ) from e
    face_mesh = mp.solutions.face_mesh
    lip_ids = sorted({i for edge in face_mesh.FACEMESH_LIPS for i in edge})
    lips, eyes, detected = [], [], []
    with face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                            min_detection_confidence=0.5, min_tracking_confidence=0.5) as mesh:
        for frame in frames:
            h, w = frame.shape[:2]
            result = mesh.process(frame)
            if result.multi_face_landmarks:
                points = result.multi_face_landmarks[0].landmark
                xy = np.array([(p.x * w, p.y * h) for p in points], np.float32)
                lips.append(xy[lip_ids])
                eyes.append(xy[list(EYE_CORNERS)])
                detected.append(True)
            else:
                lips.append(np.zeros((len(lip_ids), 2), np.float32))
                eyes.append(np.zeros((2, 2), np.float32))
                detected.append(False)
    return {"lips": np.stack(lips), "eyes": np.stack(eyes), "detected": np.array(detected, bool)}


def landmark_path(out: Path, src: Path, video: Path) -> Path:
    return out / "landmarks" / video.relative_to(src).with_suffix(".npz")


def save_landmarks(path: Path, landmarks: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **landmarks)


def _landmark_job(job) -> tuple[str, str | None]:
    src, out, video = (Path(p) for p in job)
    target = landmark_path(out, src, video)
    if target.exists():
        return str(video), None
    try:
        save_landmarks(target, detect_landmarks(iter_rgb_frames(video)))
    except (MediaError, OSError) as e:
        return str(video), str(e)
    return str(video), None


# ---- crops -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSettings:
    size: int = CROP_SIZE
    eye_distance: float = 100.0  # output px between the outer eye corners: the mouth then spans about 55 px
    smooth_window: int = 12  # frames, as auto_avsr smooths its landmarks
    max_seconds: float = 16.0  # longer clips are cut at word boundaries, as auto_avsr's seg16s


def crop_clip(frames: np.ndarray, fps: float, landmarks: dict, settings: CropSettings, path="clip") -> np.ndarray:
    """(T', size, size, 3) mouth crops at 25 fps of (T, H, W, 3) frames with their landmarks."""
    detected = np.asarray(landmarks["detected"], bool)
    if len(detected) != len(frames):
        raise MediaError(path, f"landmarks cover {len(detected)} frames, the video has {len(frames)}; "
                               "delete the stale landmark file and rerun the landmark stage")
    if not detected.any():
        raise MediaError(path, "no face found in any frame")
    if detected.mean() < 0.5:
        logger.warning("%s: a face was found in only %.0f%% of the frames", path, 100 * detected.mean())
    centres = smooth_track(fill_missing(mouth_centres(landmarks["lips"]), detected), settings.smooth_window)
    eye_distance = float(np.median(np.linalg.norm(np.diff(landmarks["eyes"][detected], axis=1)[:, 0], axis=-1)))
    if eye_distance < MIN_EYE_DISTANCE:
        raise MediaError(path, f"the face is too small ({eye_distance:.0f} px between the eyes; at least "
                               f"{MIN_EYE_DISTANCE:.0f} needed)")
    keep = frame_indices(len(frames), fps)
    return crop_mouth(frames[keep], centres[keep], settings.eye_distance / eye_distance, settings.size)


def _word_timings(text_path: Path) -> list[tuple[str, float, float]]:
    """(word, start, end) rows of an LRS txt ("WORD START END ASDSCORE" after a header line), or []."""
    words, inside = [], False
    for line in text_path.read_text(errors="replace").splitlines():
        parts = line.split()
        if parts[:1] == ["WORD"]:
            inside = True
        elif inside and len(parts) >= 3:
            try:
                words.append((parts[0].lower(), float(parts[1]), float(parts[2])))
            except ValueError:
                break
    return words


def _crop_job(job) -> tuple[str, str | None, list[tuple[str, int, str]]]:
    """Crop one raw clip into one or more outputs; returns (id, error, [(relative mp4, frames, text)])."""
    from .loading import align_audio_to_video
    from .lrs import read_lrs_transcript

    src, out, dataset, split, entry_id, video, text_path, settings = job
    src, out, video, text_path = Path(src), Path(out), Path(video), Path(text_path)
    relative_dir = Path(f"{dataset}_video_seg16s") / split
    video_dir, text_dir = out / dataset / relative_dir, out / dataset / f"{dataset}_text_seg16s" / split
    try:
        text = read_lrs_transcript(text_path)
        landmarks_file = landmark_path(out, src, video)
        done_marker = video_dir / f"{entry_id}.done"
        if not done_marker.exists():
            if not landmarks_file.exists():
                raise MediaError(video, f"no landmarks at {landmarks_file}; run the landmark stage first")
            with np.load(landmarks_file) as data:
                landmarks = {k: data[k] for k in data.files}
            frames, fps, audio = read_clip(video)
            if audio is None:
                raise MediaError(video, "has no audio track")
            crops = crop_clip(frames, fps, landmarks, settings, video)
            audio = align_audio_to_video(audio, len(crops), video)
            duration = len(crops) / FPS
            if duration > settings.max_seconds:
                words = _word_timings(text_path)
                if not words:
                    raise MediaError(video, f"lasts {duration:.1f} s and its transcript has no word timings to cut "
                                            f"it into segments of at most {settings.max_seconds:g} s")
                pieces = [(f"{entry_id}_{k:02d}", start, end, words_text) for k, (start, end, words_text)
                          in enumerate(split_at_words(words, settings.max_seconds))]
            else:
                pieces = [(entry_id, 0.0, duration, text)]
            (video_dir / entry_id).parent.mkdir(parents=True, exist_ok=True)
            (text_dir / entry_id).parent.mkdir(parents=True, exist_ok=True)
            names = []
            for name, start, end, piece_text in pieces:
                first, last = int(start * FPS), max(int(start * FPS) + 1, min(len(crops), int(np.ceil(end * FPS))))
                write_wav(video_dir / f"{name}.wav", audio[first * SAMPLE_RATE // FPS : last * SAMPLE_RATE // FPS])
                (text_dir / f"{name}.txt").write_text(piece_text + "\n")
                write_mp4(video_dir / f"{name}.mp4", crops[first:last])
                names.append(f"{name}\t{last - first}")
            write_bytes_atomic(done_marker, ("\n".join(names) + "\n").encode())  # last: marks the clip complete
        rows = []
        for line in done_marker.read_text().splitlines():
            name, frames_count = line.split("\t")
            piece_text = (text_dir / f"{name}.txt").read_text().strip()
            rows.append((str(relative_dir / f"{name}.mp4"), int(frames_count), piece_text))
        return entry_id, None, rows
    except (ValueError, OSError) as e:  # MediaError and TranscriptError are ValueErrors
        return entry_id, str(e), []


# ---- driver ----------------------------------------------------------------------------------------------------------


def _run_parallel(function, jobs, workers: int, description: str, progress: bool):
    """Yields function(job) for every job, in parallel processes when workers > 1, with a progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the landmark environment may lack tqdm: fall back to log lines
        tqdm = None
    bar = tqdm(total=len(jobs), desc=description, unit="clip", disable=not progress) if tqdm else None
    if workers > 1:
        # spawn: mediapipe's graph and PyAV's codecs are not fork-safe once initialised
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(function, jobs)
    else:
        pool, results = None, map(function, jobs)
    try:
        for done, result in enumerate(results, start=1):
            if bar is not None:
                bar.update()
            elif progress and (done % max(1, len(jobs) // 20) == 0 or done == len(jobs)):
                logger.info("%s: %d/%d", description, done, len(jobs))
            yield result
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()


def _record_failures(out: Path, failures: list[tuple[str, str]]):
    if not failures:
        return
    with open(out / "preprocess_failures.txt", "a") as f:
        for name, error in failures:
            f.write(f"{name}\t{error}\n")
    logger.warning("%d clips failed (listed in %s), e.g. %s", len(failures), out / "preprocess_failures.txt",
                   failures[0][1])


def preprocess(src, out, dataset: str = "lrs3", split: str = "test", stage: str = "all", workers: int = 1,
               settings: CropSettings = CropSettings(), progress: bool = True) -> dict:
    """Run the landmark and/or crop stage over raw `src`; returns counts {"landmarks": n, "clips": n, "failed": n}.

    The landmark stage covers every mp4 under `src`; the crop stage the official `split` of `dataset` and writes
    `out/labels/{dataset}_{split}_transcript_lengths_seg16s.csv`, readable with `load_lrs(out, dataset, split)`."""
    src, out = Path(src), Path(out)
    if stage not in ("landmarks", "crop", "all"):
        raise ValueError(f"stage must be 'landmarks', 'crop' or 'all', got {stage!r}")
    out.mkdir(parents=True, exist_ok=True)
    counts = {"landmarks": 0, "clips": 0, "failed": 0}
    if stage in ("landmarks", "all"):
        videos = sorted(p for p in src.rglob("*.mp4") if not out.resolve() in p.resolve().parents)
        failures = []
        for name, error in _run_parallel(_landmark_job, [(str(src), str(out), str(v)) for v in videos], workers,
                                         "landmarks", progress):
            if error:
                failures.append((name, error))
        counts["landmarks"] = len(videos) - len(failures)
        counts["failed"] += len(failures)
        _record_failures(out, failures)
    if stage in ("crop", "all"):
        from .lrs import LRSReport, _deduplicate_and_check, _list_raw

        report = LRSReport(dataset=dataset, split=split, layout="raw", root=str(src))
        entries = _deduplicate_and_check(_list_raw(src, dataset, split, report), report)
        if report.problems:
            logger.warning("%s", report.summary())
        split_name = Path(entries[0].video_path).parent.parent.name if entries else split
        jobs = [(str(src), str(out), dataset, split_name, e.id, str(e.video_path), str(e.text_path), settings)
                for e in entries]
        rows, failures = [], []
        for entry_id, error, produced in _run_parallel(_crop_job, jobs, workers, "mouth crops", progress):
            if error:
                failures.append((entry_id, error))
            rows += produced
        rows.sort()
        labels = out / "labels"
        labels.mkdir(exist_ok=True)
        csv_path = labels / f"{dataset}_{split}_transcript_lengths_seg16s.csv"
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for relative, frames_count, text in rows:
                # auto_avsr's columns plus the transcript, as the reference Llama-AVSR reads them
                writer.writerow([dataset, relative, frames_count, "", text])
        counts["clips"] = len(rows)
        counts["failed"] += len(failures)
        _record_failures(out, failures)
        logger.info("%d mouth-crop clips of %s %s in %s (%s)", len(rows), dataset, split, out, csv_path.name)
    return counts


def add_preprocess_arguments(parser):
    """Arguments of `llama-avsr preprocess`."""
    parser.add_argument("--src", required=True, help="raw LRS2/LRS3 root (LRS3: pretrain/ trainval/ test/; LRS2: "
                                                     "the split lists and mvlrs_v1/)")
    parser.add_argument("--out", required=True, help="output root in the auto_avsr layout (load_lrs reads it)")
    parser.add_argument("--dataset", default="lrs3", choices=["lrs2", "lrs3"])
    parser.add_argument("--split", default="test", help="official split to crop (lrs3: pretrain, trainval, test; "
                                                        "lrs2: pretrain, train, val, test)")
    parser.add_argument("--stage", default="all", choices=["landmarks", "crop", "all"],
                        help="landmarks needs mediapipe (own environment, see the module docstring)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--eye-distance", type=float, default=CropSettings.eye_distance,
                        help="output pixels between the outer eye corners (sets the crop's scale)")
    parser.add_argument("--smooth-window", type=int, default=CropSettings.smooth_window)
    parser.add_argument("--max-seconds", type=float, default=CropSettings.max_seconds,
                        help="longer clips are cut at word boundaries")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_preprocess(args) -> int:
    settings = CropSettings(eye_distance=args.eye_distance, smooth_window=args.smooth_window,
                            max_seconds=args.max_seconds)
    counts = preprocess(args.src, args.out, dataset=args.dataset, split=args.split, stage=args.stage,
                        workers=args.workers, settings=settings, progress=not args.no_progress)
    logger.info("preprocess: %s", counts)
    return 0 if counts["failed"] == 0 else 1


def main(argv=None) -> int:
    parser = add_preprocess_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stage != "landmarks" and not __package__:
        parser.error("run the crop stage inside the package: `llama-avsr preprocess` or "
                     "`python -m modeling_llama_avsr.data.preprocess`")
    return run_preprocess(args)


if __name__ == "__main__":
    sys.exit(main())
