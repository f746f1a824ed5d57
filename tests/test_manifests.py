"""Manifests are checked row by row when they are read: bad rows are named by csv file and line, before training."""

import csv
import json

import pytest

from modeling_llama_avsr.data import ManifestError, load_lrs, load_manifest, make_corpus


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def touch_clip(root, relative):
    for suffix in (".wav", ".mp4"):
        target = (root / relative).with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")


def test_bad_manifest_rows_are_named_by_line(tmp_path):
    for i in range(7):
        touch_clip(tmp_path, f"train/s{i}.mp4")
    manifest = write_csv(tmp_path / "train.csv", [
        ["synthetic", "train/s0.mp4", "25", "1 2", "place blue\tat  f"],  # fine: tab and spaces collapse
        ["synthetic", "train/s1.mp4", "25", "1 2", "   "],  # empty transcript
        ["synthetic", "train/s2.mp4", "25", "1 2", "ring \x07 bell"],  # BEL, a control character
        ["synthetic", "train/missing.mp4", "25", "1 2", "no files"],
        ["synthetic", "train/s3.mp4", "0", "1 2", "no frames"],
        ["synthetic", "train/s4.mp4", "800", "1 2", "thirty two seconds"],
        ["synthetic", "train/s5.mp4", "25", "1 2"],
        ["synthetic", "train/s6.mp4", "twenty", "1 2", "frames not a number"],
    ])
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest, tmp_path)
    problems = caught.value.problems
    where = str(manifest)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{where}:{line}" for line in range(2, 9)]
    for line, text in ((2, "transcript is empty"), (3, "U+0007"), (4, "no such file"), (5, "'0' is not a positive"),
                       (6, "lasts 32.0 s, longer than max_seconds=30"), (7, "expected 5 columns"),
                       (8, "'twenty' is not a positive integer")):
        assert text in problems[line - 2], (line, problems[line - 2])
    assert f"{where}: 7 bad rows" in str(caught.value)

    good = write_csv(tmp_path / "good.csv", [["synthetic", "train/s0.mp4", "25", "1 2", "place blue\tat  f"]])
    data = load_manifest(good, tmp_path)
    assert data["text"] == ["place blue at f"] and data["duration"] == [1.0]
    assert data["audio_path"] == [str(tmp_path / "train" / "s0.wav")]


def test_lrs_csv_rows_are_checked_with_their_line(tmp_path):
    root = tmp_path / "lrs"
    for i in range(4):
        touch_clip(root / "lrs3", f"lrs3_video_seg16s/test/spk/{i:05d}.mp4")
    (root / "labels").mkdir()
    manifest = write_csv(root / "labels" / "lrs3_test_transcript_lengths_seg16s.csv", [
        ["lrs3", "lrs3_video_seg16s/test/spk/00000.mp4", "30", "1 2", "fine words"],
        ["lrs3", "lrs3_video_seg16s/test/spk/00001.mp4", "30", "1 2", "bell \x07"],
        ["lrs3", "lrs3_video_seg16s/test/spk/00002.mp4", "0", "1 2", "no frames"],
        ["lrs3", "lrs3_video_seg16s/test/spk/00003.mp4", "900", "1 2", "thirty six seconds"],
    ])
    data, report = load_lrs(root, "lrs3", "test", return_report=True)
    assert data["text"] == ["fine words"]
    assert any(u.startswith(f"{manifest}:2: ") and "U+0007" in u for u in report.unreadable), report.unreadable
    assert any(u.startswith(f"{manifest}:3: ") for u in report.unreadable), report.unreadable
    assert report.too_long == ["lrs3_video_seg16s/test/spk/00003 (36.0 s)"]  # over Whisper's 30 s


def test_corpus_mismatch_names_the_real_flags(tmp_path):
    (tmp_path / "corpus_info.json").write_text(json.dumps({"format_version": 0, "seed": 7, "complete": True}))
    with pytest.raises(ValueError) as caught:
        make_corpus(tmp_path, num_train=2, num_validation=1, num_test=1)
    message = str(caught.value)
    assert "`examples/run_avsr.py --overwrite_corpus`" in message and "make-corpus --overwrite`" in message
