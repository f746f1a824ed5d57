"""LRS2 and LRS3 in one call, in either of the two forms users have them.

LRS2/LRS3 are licensed (BBC / TED): users download them and point `load_lrs` at the folder.

auto_avsr layout (after auto_avsr's preprocessing, or `llama-avsr preprocess`):
    ROOT/labels/{dataset}_{split}*.csv                  rows: dataset, relative_path, n_frames, token_ids[, transcript]
    ROOT/{dataset}/{dataset}_video_seg16s/SPLIT/SPEAKER/ID.mp4   96x96 mouth crop, 25 fps, no audio track
    ROOT/{dataset}/{dataset}_video_seg16s/SPLIT/SPEAKER/ID.wav   16 kHz mono
    ROOT/{dataset}/{dataset}_text_seg16s/SPLIT/SPEAKER/ID.txt    transcript (used when the csv has no 5th column)
  `relative_path` is resolved against ROOT/{dataset} (auto_avsr) or ROOT (the synthetic corpus); `labels/{split}.csv`
  is accepted too.

raw layout (as downloaded):
    LRS3: ROOT/{pretrain,trainval,test}/SPEAKER/ID.{mp4,txt}        the folders are the official splits
    LRS2: ROOT/{pretrain,train,val,test}.txt                        official lists of SPEAKER/ID (test lines carry
          ROOT[/mvlrs_v1]/{main,pretrain}/SPEAKER/ID.{mp4,txt}      a flag after the id, which is ignored)
  The mp4 is the face video with its audio track; the txt's first line is `Text:  TRANSCRIPT`.

Rows: id, dataset, audio_path (the wav, or the mp4 itself in the raw layout: `read_audio` takes its track),
video_path, text (lower-cased by default, as auto_avsr's csvs are), num_frames, duration (num_frames / 25).
Missing or duplicated files, unreadable transcripts or headers, csv rows without a positive frame count or with a
transcript that `check_transcript` refuses (named by csv file and line), and clips over `max_duration` (or over
Whisper's 30 s, which no reader accepts) are skipped and counted in an `LRSReport` (logged; `return_report=True`
returns it), never fatal. Raw clips are probed for their frame count
(PyAV header, a few ms each, in threads). `streaming=True` returns a `datasets.IterableDataset` that lists the files
up front (cheap) but reads transcripts and probes headers only as rows are consumed, for pretrain-size splits.
"""

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .loading import FPS, MAX_CLIP_SECONDS, MediaError, TranscriptError, check_transcript, probe_media

__all__ = ["LRSReport", "load_lrs", "read_lrs_transcript"]

logger = logging.getLogger(__name__)

DATASETS = ("lrs2", "lrs3")
LAYOUTS = ("auto", "auto_avsr", "raw")
# user-facing split names -> the official ones (LRS3 has no validation split; auto_avsr holds out part of trainval)
SPLIT_ALIASES = {
    "lrs3": {"train": "trainval", "trainval": "trainval", "pretrain": "pretrain", "test": "test"},
    "lrs2": {"train": "train", "val": "val", "validation": "val", "pretrain": "pretrain", "test": "test"},
}
COLUMNS = ("id", "dataset", "audio_path", "video_path", "text", "num_frames", "duration")
_EXAMPLES = 5  # problems listed by name in the summary; the rest are counted


@dataclass
class LRSReport:
    """What `load_lrs` found: kept rows, and every skipped one with its reason."""

    dataset: str
    split: str
    layout: str
    root: str
    listed: int = 0
    kept: int = 0
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return len(self.missing) + len(self.duplicates) + len(self.unreadable) + len(self.too_long)

    def summary(self) -> str:
        lines = [f"{self.dataset} {self.split} ({self.layout} layout, {self.root}): {self.listed} listed, "
                 f"{self.kept} kept"]
        for name in ("missing", "duplicates", "unreadable", "too_long"):
            items = getattr(self, name)
            if items:
                more = f" (+{len(items) - _EXAMPLES} more)" if len(items) > _EXAMPLES else ""
                lines.append(f"  {len(items)} {name.replace('_', ' ')}: {'; '.join(items[:_EXAMPLES])}{more}")
        return "\n".join(lines)


def read_lrs_transcript(path, lowercase: bool = True) -> str:
    """The transcript of an LRS txt (`Text:  WORDS` on the first line) or of a plain one-line txt (auto_avsr)."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TranscriptError(path, f"transcript is not UTF-8 ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise TranscriptError(path, f"cannot read transcript ({e.strerror})") from e
    lines = raw.splitlines()
    first = lines[0].strip() if lines else ""
    if first.startswith("Text:"):
        first = first[len("Text:"):]
    elif any(line.startswith(("Conf:", "WORD ")) for line in lines[1:3]):
        raise TranscriptError(path, "LRS transcript without a `Text:` line")
    text = check_transcript(first, path)
    return text.lower() if lowercase else text


# ---- listing: cheap, no media is opened ----------------------------------------------------------------------------

@dataclass
class _Entry:
    id: str
    video_path: Path
    audio_path: Path
    text: str | None = None  # from the csv; else read from text_path
    text_path: Path | None = None
    num_frames: int | None = None  # from the csv; else probed


def _resolve_layout(root: Path, layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "auto":
        layout = "auto_avsr" if any((root / "labels").glob("*.csv")) else "raw"
    return layout


def _label_csv(root: Path, dataset: str, split: str) -> Path:
    labels = root / "labels"
    names = dict.fromkeys([split, SPLIT_ALIASES[dataset].get(split, split)])
    candidates = []
    for name in names:
        candidates += [labels / f"{name}.csv"] if (labels / f"{name}.csv").is_file() else []
        candidates += sorted(labels.glob(f"{dataset}_{name}_*.csv")) + sorted(labels.glob(f"{dataset}_{name}.csv"))
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) != 1:
        available = ", ".join(sorted(p.name for p in labels.glob("*.csv"))) or "none"
        what = "no label csv" if not candidates else f"several label csvs ({', '.join(p.name for p in candidates)})"
        raise FileNotFoundError(f"{labels}: {what} for {dataset} split {split!r}; csvs there: {available}. Pass the "
                                "csv's split name (e.g. 'test' for lrs3_test_transcript_lengths_seg16s.csv)")
    return candidates[0]


def _list_auto_avsr(root: Path, dataset: str, split: str, report: LRSReport) -> list[_Entry]:
    csv_path = _label_csv(root, dataset, split)
    entries = []
    with open(csv_path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            where = f"{csv_path}:{line}"
            if len(row) < 4 or not row[2].strip().isdigit():
                report.unreadable.append(f"{where}: not `dataset, path, frames, tokens[, text]`")
                continue
            if int(row[2]) == 0:
                report.unreadable.append(f"{where}: 0 video frames")
                continue
            text = None
            if len(row) >= 5:
                try:  # checked here, where the csv line is known; auto_avsr writes transcripts unquoted
                    text = check_transcript(",".join(row[4:]), where)
                except TranscriptError as e:
                    report.unreadable.append(str(e))
                    continue
            name, relative = row[0], row[1]
            base = root / name if (root / name).is_dir() else root  # auto_avsr: ROOT/lrs3/...; synthetic: ROOT/...
            stem = (base / relative).with_suffix("")
            text_path = Path(str(stem).replace("_video_seg16s", "_text_seg16s")).with_suffix(".txt")
            entries.append(_Entry(
                id=str(Path(relative).with_suffix("")), video_path=stem.with_suffix(".mp4"),
                audio_path=stem.with_suffix(".wav"), num_frames=int(row[2]),
                text=text, text_path=None if len(row) >= 5 else text_path,
            ))
    return entries


def _raw_entry(folder: Path, speaker_id: str) -> _Entry:
    mp4 = folder / f"{speaker_id}.mp4"
    return _Entry(id=speaker_id, video_path=mp4, audio_path=mp4, text_path=mp4.with_suffix(".txt"))


def _list_raw(root: Path, dataset: str, split: str, report: LRSReport) -> list[_Entry]:
    official = SPLIT_ALIASES[dataset].get(split)
    if official is None:
        raise ValueError(f"{dataset} has no split {split!r}; choose from {sorted(SPLIT_ALIASES[dataset])}")
    if dataset == "lrs3":
        folder = root / official
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no LRS3 {official} folder (expected ROOT/{{pretrain,trainval,test}})")
        stems = {}
        for path in sorted(folder.glob("*/*")):
            if path.suffix.lower() in (".mp4", ".txt"):
                stems.setdefault(f"{path.parent.name}/{path.stem}", set()).add(path.suffix.lower())
        entries = []
        for speaker_id, suffixes in stems.items():
            if suffixes != {".mp4", ".txt"}:
                lacking = ".txt" if ".txt" not in suffixes else ".mp4"
                report.missing.append(f"{folder / speaker_id}{lacking}")
                continue
            entries.append(_raw_entry(folder, speaker_id))
        return entries
    # LRS2: official lists next to mvlrs_v1/ (or next to main/ and pretrain/)
    list_path = root / f"{official}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(f"{list_path}: no LRS2 split list (expected ROOT/{{pretrain,train,val,test}}.txt)")
    base = root / "mvlrs_v1" if (root / "mvlrs_v1").is_dir() else root
    folder = base / ("pretrain" if official == "pretrain" else "main")
    entries = []
    for line in list_path.read_text().splitlines():
        if line.strip():
            entries.append(_raw_entry(folder, line.split()[0]))
    return entries


def _deduplicate_and_check(entries: list[_Entry], report: LRSReport) -> list[_Entry]:
    """Drop repeated ids and entries whose files are missing (a stat per file)."""
    seen, kept = set(), []
    for entry in entries:
        if entry.id in seen:
            report.duplicates.append(entry.id)
            continue
        seen.add(entry.id)
        needed = dict.fromkeys([entry.video_path, entry.audio_path] + ([entry.text_path] if entry.text_path else []))
        absent = [str(p) for p in needed if not p.is_file()]
        if absent:
            report.missing.extend(absent)
            continue
        kept.append(entry)
    return kept


# ---- resolving: transcripts and frame counts -------------------------------------------------------------------------

def _resolve(entry: _Entry, dataset: str, lowercase: bool) -> dict:
    """A row, or raises MediaError / TranscriptError naming the file."""
    if entry.text is not None:
        text = check_transcript(entry.text, entry.video_path)
        text = text.lower() if lowercase else text
    else:
        text = read_lrs_transcript(entry.text_path, lowercase)
    num_frames = entry.num_frames
    if num_frames is None:
        info = probe_media(entry.video_path)
        if not info.has_video or info.num_frames <= 0:
            raise MediaError(entry.video_path, "has no video frames")
        if not info.has_audio and entry.audio_path == entry.video_path:
            raise MediaError(entry.video_path, "has no audio track")
        # at another frame rate, read_video picks frames at 25 fps: count what it will return
        num_frames = max(1, round(info.num_frames * FPS / info.fps)) if info.fps else info.num_frames
    return {"id": entry.id, "dataset": dataset, "audio_path": str(entry.audio_path),
            "video_path": str(entry.video_path), "text": text, "num_frames": int(num_frames),
            "duration": num_frames / FPS}


def _features():
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"), "dataset": datasets.Value("string"),
        "audio_path": datasets.Value("string"), "video_path": datasets.Value("string"),
        "text": datasets.Value("string"), "num_frames": datasets.Value("int64"), "duration": datasets.Value("float64"),
    })


def _stream_rows(shards: list[list[_Entry]], dataset: str, lowercase: bool, max_duration: float | None):
    # datasets hands each generator call a sub-list of the `shards` list
    for entry in (entry for shard in shards for entry in shard):
        try:
            row = _resolve(entry, dataset, lowercase)
        except (MediaError, TranscriptError) as e:
            logger.warning("skipping %s: %s", entry.id, e)
            continue
        if row["duration"] > min(max_duration or MAX_CLIP_SECONDS, MAX_CLIP_SECONDS):
            continue
        yield row


def load_lrs(root, dataset: str = "lrs3", split: str = "test", layout: str = "auto",
             max_duration: float | None = None, streaming: bool = False, lowercase: bool = True,
             num_workers: int = 4, num_shards: int = 16, return_report: bool = False):
    """LRS2 / LRS3 `split` under `root` as a `datasets.Dataset` (or `IterableDataset` with `streaming=True`).

    Args:
        dataset: "lrs3" or "lrs2". split: LRS3 "pretrain" | "trainval" (alias "train") | "test"; LRS2 "pretrain" |
            "train" | "val" (alias "validation") | "test"; in the auto_avsr layout, the split part of the label csv's
            name (`lrs3_{split}_transcript_lengths_seg16s.csv`) or a `labels/{split}.csv`.
        layout: "auto_avsr", "raw", or "auto" (auto_avsr if `root/labels/*.csv` exist).
        max_duration: drop clips longer than this many seconds (counted in the report).
        num_workers: threads probing raw clips' headers. num_shards: shards of the streaming dataset (so that
            DataLoader workers and `split_dataset_by_node` can divide it).
        return_report: return `(dataset, LRSReport)`.
    """
    root = Path(root)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    layout = _resolve_layout(root, layout)
    report = LRSReport(dataset=dataset, split=split, layout=layout, root=str(root))
    listed = (_list_auto_avsr if layout == "auto_avsr" else _list_raw)(root, dataset, split, report)
    report.listed = len(listed) + len(report.unreadable) + len(report.missing)
    entries = _deduplicate_and_check(listed, report)

    if streaming:
        import datasets

        shards = [entries[i::num_shards] for i in range(min(num_shards, len(entries)))] or [[]]
        stream = datasets.IterableDataset.from_generator(
            _stream_rows, features=_features(),
            gen_kwargs={"shards": shards, "dataset": dataset, "lowercase": lowercase, "max_duration": max_duration},
        )
        report.kept = len(entries)  # before transcripts and headers are read, which happens as rows are consumed
        _log(report)
        return (stream, report) if return_report else stream

    def resolve(entry):
        try:
            return _resolve(entry, dataset, lowercase)
        except (MediaError, TranscriptError) as e:
            return e

    with ThreadPoolExecutor(max(1, num_workers)) as pool:  # header probes and small reads: I/O bound
        results = list(pool.map(resolve, entries))
    rows = []
    limit = min(max_duration, MAX_CLIP_SECONDS) if max_duration is not None else MAX_CLIP_SECONDS
    for entry, result in zip(entries, results):
        if isinstance(result, Exception):
            report.unreadable.append(str(result))
        elif result["duration"] > limit:
            report.too_long.append(f"{entry.id} ({result['duration']:.1f} s)")
        else:
            rows.append(result)
    report.kept = len(rows)
    _log(report)
    import datasets

    table = {name: [row[name] for row in rows] for name in COLUMNS}
    result = datasets.Dataset.from_dict(table, features=_features())
    return (result, report) if return_report else result


def _log(report: LRSReport):
    if report.problems:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
