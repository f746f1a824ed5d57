"""Small LRS2/LRS3 trees in both layouts, built from the synthetic corpus, and malformed media files, for the tests.

Raw clips are synthetic faces: a skin-coloured oval with eyes, brows and a nose, the corpus's 96x96 mouth blended in
at a known place (optionally drifting), the utterance's audio muxed in as an AAC track, and an LRS txt
(`Text:  TRANSCRIPT` in capitals, `Conf:`, then word timings).
"""

import csv
import shutil
from pathlib import Path

import numpy as np

FACE_SIZE = 224
MOUTH_CENTRE = (112.0, 160.0)  # x, y in the face frame
EYE_CENTRES = ((62.0, 95.0), (162.0, 95.0))  # the outer eye corners lie 100 px apart: crop scale 1 at the default


def corpus_rows(corpus: Path, split: str) -> list[list[str]]:
    with open(corpus / "labels" / f"{split}.csv", newline="") as f:
        return [row for row in csv.reader(f) if row]


def face_frames(mouth: np.ndarray, centres: np.ndarray, seed: int = 0) -> np.ndarray:
    """(T, 224, 224, 3) uint8 faces with the (T, 96, 96) gray mouth frames blended in at `centres` (T, 2) x, y."""
    rng = np.random.default_rng(seed)
    t = len(mouth)
    yy, xx = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE].astype(np.float32)
    skin = 150.0 + rng.uniform(-20, 20)
    face = np.full((FACE_SIZE, FACE_SIZE), 60.0, np.float32)  # dark background
    oval = ((xx - 112) / 92) ** 2 + ((yy - 118) / 112) ** 2 < 1
    face[oval] = skin - 0.15 * (yy[oval] - 118)
    for ex, ey in EYE_CENTRES:
        eye = ((xx - (ex + (12 if ex < 112 else -12))) / 20) ** 2 + ((yy - ey) / 9) ** 2 < 1
        face[eye] = 235
        face[((xx - (ex + (12 if ex < 112 else -12))) / 7) ** 2 + ((yy - ey) / 7) ** 2 < 1] = 30
        face[(np.abs(yy - (ey - 18)) < 3) & (np.abs(xx - (ex + (12 if ex < 112 else -12))) < 22)] = 70  # brow
    face[((xx - 112) / 10) ** 2 + ((yy - 128) / 6) ** 2 < 1] = skin - 45  # nostrils' shadow
    frames = np.repeat(face[None], t, axis=0)
    # blend each mouth patch with a soft round mask so that its square border does not show
    py, px = np.mgrid[0:96, 0:96].astype(np.float32) - 47.5
    mask = np.clip((44 - np.sqrt(px**2 + py**2)) / 8, 0, 1)
    for i in range(t):
        x0, y0 = int(round(centres[i, 0] - 47.5)), int(round(centres[i, 1] - 47.5))
        region = frames[i, y0 : y0 + 96, x0 : x0 + 96]
        region[:] = region * (1 - mask) + mouth[i].astype(np.float32) * mask
    frames += rng.normal(0, 1.5, frames.shape).astype(np.float32)
    return np.repeat(np.clip(np.rint(frames), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def write_face_mp4(path: Path, frames: np.ndarray, audio: np.ndarray | None, sample_rate: int = 16000,
                   fps: int = 25, audio_rate: int | None = None, channels: int = 1):
    """H.264 video (+ AAC audio at `audio_rate`, `channels`) mp4, as LRS ships it."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.codec_context.options = {"crf": "20", "preset": "ultrafast", "threads": "1"}
        sound = None
        if audio is not None:
            rate = audio_rate or sample_rate
            if rate != sample_rate:
                import soxr

                audio = soxr.resample(audio, sample_rate, rate, quality="VHQ")
            sound = container.add_stream("aac", rate=rate, layout="mono" if channels == 1 else "stereo")
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None:
            planes = np.repeat(audio[None].astype(np.float32), channels, axis=0)
            for start in range(0, planes.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, start : start + 1024]),
                                                   format="fltp", layout=sound.layout.name)
                chunk.sample_rate, chunk.pts = sound.rate, start
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)


def lrs_txt(text: str, duration: float) -> str:
    """An LRS transcript file: capitals, confidence, then evenly spread word timings."""
    words = text.upper().split()
    step = duration / max(1, len(words))
    timings = "\n".join(f"{w} {i * step:.2f} {(i + 1) * step:.2f} 1.0" for i, w in enumerate(words))
    return f"Text:  {text.upper()}\nConf:  4\n\nWORD START END ASDSCORE\n{timings}\n"


def raw_clip(corpus: Path, row: list[str], folder: Path, name: str, seed: int = 0, drift: float = 0.0):
    """Write folder/name.{mp4,txt} for one corpus row; returns the (T, 2) mouth centres used."""
    from modeling_llama_avsr.data import read_audio, read_video

    stem = corpus / Path(row[1]).with_suffix("")
    mouth, audio = read_video(stem.with_suffix(".mp4")), read_audio(stem.with_suffix(".wav"))
    t = np.arange(len(mouth))
    centres = np.stack([MOUTH_CENTRE[0] + drift * np.sin(t / 7), MOUTH_CENTRE[1] + drift * np.cos(t / 9)], axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    write_face_mp4(folder / f"{name}.mp4", face_frames(mouth, centres, seed), audio)
    (folder / f"{name}.txt").write_text(lrs_txt(",".join(row[4:]), len(mouth) / 25))
    return centres


def make_raw_lrs3(corpus: Path, root: Path, splits: dict[str, int]) -> dict[str, list[list[str]]]:
    """ROOT/{trainval,test,pretrain}/SPEAKER/ID.{mp4,txt} from the first n test-split rows of the corpus."""
    rows = corpus_rows(corpus, "test")
    used, start = {}, 0
    for split, n in splits.items():
        used[split] = rows[start : start + n]
        for i, row in enumerate(used[split]):
            speaker = Path(row[1]).parent.name
            raw_clip(corpus, row, root / split / speaker, f"{i:05d}", seed=i)
        start += n
    return used


def make_raw_lrs2(corpus: Path, root: Path, splits: dict[str, int]) -> dict[str, list[list[str]]]:
    """ROOT/{train,val,test,pretrain}.txt + ROOT/mvlrs_v1/{main,pretrain}/SPEAKER/ID.{mp4,txt}."""
    rows = corpus_rows(corpus, "test")
    used, start = {}, 0
    for split, n in splits.items():
        used[split] = rows[start : start + n]
        folder = root / "mvlrs_v1" / ("pretrain" if split == "pretrain" else "main")
        ids = []
        for i, row in enumerate(used[split]):
            speaker = f"{5535415699068794046 + start + i}"
            raw_clip(corpus, row, folder / speaker, f"{i:05d}", seed=i)
            ids.append(f"{speaker}/{i:05d}" + (" NF" if split == "test" else ""))
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
        start += n
    return used


def make_auto_avsr(corpus: Path, root: Path, dataset: str, splits: dict[str, int],
                   with_text_column: bool = True) -> dict[str, list[list[str]]]:
    """ROOT/labels/{dataset}_{split}_transcript_lengths_seg16s.csv + ROOT/{dataset}/{dataset}_video_seg16s/...;
    without the text column, transcripts go to {dataset}_text_seg16s txt files (auto_avsr's own csvs)."""
    rows = corpus_rows(corpus, "test")
    folder = {"lrs3": {"train": "trainval"}, "lrs2": {"train": "main", "val": "main", "test": "main"}}[dataset]
    (root / "labels").mkdir(parents=True, exist_ok=True)
    used, start = {}, 0
    for split, n in splits.items():
        used[split] = rows[start : start + n]
        lines = []
        for row in used[split]:
            rel = Path(f"{dataset}_video_seg16s") / folder.get(split, split) / Path(row[1]).parent.name / Path(row[1]).name
            target = root / dataset / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            for ext in (".mp4", ".wav"):
                shutil.copy(corpus / Path(row[1]).with_suffix(ext), target.with_suffix(ext))
            if with_text_column:
                lines.append([dataset, str(rel), row[2], "12 34 56", ",".join(row[4:])])
            else:
                text_path = Path(str(target).replace("_video_seg16s", "_text_seg16s")).with_suffix(".txt")
                text_path.parent.mkdir(parents=True, exist_ok=True)
                text_path.write_text(",".join(row[4:]).upper() + "\n")
                lines.append([dataset, str(rel), row[2], "12 34 56"])
        with open(root / "labels" / f"{dataset}_{split}_transcript_lengths_seg16s.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(lines)
        start += n
    return used


def tiny_corpus(directory: Path, num_test: int = 8) -> Path:
    """A synthetic corpus whose test split feeds the trees (about 1 s to build)."""
    from modeling_llama_avsr.data import make_corpus

    return make_corpus(directory, num_train=1, num_validation=1, num_test=num_test, progress=False)
