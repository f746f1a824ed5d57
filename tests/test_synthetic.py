"""Fast tests of the synthetic audio-visual corpus: synthesis timings, resampling, the mouth, building and loading."""

import csv
import hashlib
import json
import math
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("av")
pytest.importorskip("decord")

from modeling_llama_avsr.data import MediaError, load_synthetic, make_corpus, read_audio, read_video  # noqa: E402
from modeling_llama_avsr.data.mouth import (  # noqa: E402
    VISEME_SHAPES,
    Appearance,
    mouth_track,
    render_mouth,
    viseme_of,
)

SIZES = dict(num_train=6, num_validation=2, num_test=2)


def test_synthesize_timings():
    from modeling_llama_avsr.data.tts import synthesize

    utt = synthesize("place blue at f two now", voice="en-us+f2", rate=160)
    assert utt.sample_rate == 16000 and utt.audio.dtype == np.float32 and utt.audio.ndim == 1
    assert abs(utt.duration - utt.phonemes[-1][2]) < 0.05
    assert [w for w, *_ in utt.words] == ["place", "blue", "at", "f", "two", "now"]
    starts = [s for _, s, _ in utt.words]
    assert starts == sorted(starts)
    for (_, start, end), nxt in zip(utt.words, starts[1:] + [utt.duration]):
        assert 0 <= start < end <= nxt + 1e-9
    assert 0.5 < utt.duration < 4.0 and np.abs(utt.audio).max() > 0.05


@pytest.mark.parametrize("orig_sr", [22050, 44100, 8000])
def test_read_audio_resamples_to_16k(orig_sr, tmp_path):
    import soundfile as sf

    freq, amplitude = 1000.0, 0.7
    sf.write(tmp_path / "tone.wav", amplitude * np.sin(2 * np.pi * freq * np.arange(orig_sr) / orig_sr), orig_sr,
             subtype="FLOAT")
    y = read_audio(tmp_path / "tone.wav")
    assert len(y) == 16000
    expected = amplitude * np.sin(2 * np.pi * freq * np.arange(len(y)) / 16000)
    interior = slice(200, -200)  # the edges see the zero padding outside the signal
    np.testing.assert_allclose(y[interior], expected[interior], atol=2e-4)


def test_read_audio_removes_frequencies_above_16k_nyquist(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "high.wav", np.sin(2 * np.pi * 10000.0 * np.arange(22050) / 22050), 22050, subtype="FLOAT")
    assert np.abs(read_audio(tmp_path / "high.wav")[200:-200]).max() < 1e-3


def test_mouth_open_vowel_differs_from_bilabial():
    assert viseme_of("'aI") == "aa" and viseme_of("p") == viseme_of("m") == "PP" and viseme_of("_:") == "sil"
    appearance = Appearance.sample(np.random.default_rng(0))
    track = np.array([astuple(VISEME_SHAPES["aa"])] * 3 + [astuple(VISEME_SHAPES["PP"])] * 3)
    frames = render_mouth(track, appearance, np.random.default_rng(1)).astype(float)
    assert frames.shape == (6, 96, 96)
    dark = frames < (appearance.cavity + appearance.lip) / 2  # inside of the mouth
    open_area, closed_area = dark[:3].sum(axis=(1, 2)), dark[3:].sum(axis=(1, 2))
    assert open_area.min() > 300 and closed_area.max() < 60


def test_mouth_track_follows_phonemes():
    phonemes = [("m", 0.0, 0.1), ("a", 0.1, 0.4), ("p", 0.4, 0.5)]
    track = mouth_track(phonemes, 13)  # frame centres at 0.02, 0.06, ...
    opening = track[:, 0]
    assert opening[6] > 0.9  # 0.26 s: inside the vowel
    assert opening[1] < 0.1 and opening[11] < 0.2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "a", seed=3, progress=False, **SIZES)


def _utterances(root: Path):
    return sorted(p.relative_to(root).with_suffix("") for p in root.glob("*/*/*.json"))


def test_corpus_is_deterministic(corpus, tmp_path):
    other = make_corpus(tmp_path / "b", seed=3, progress=False, num_workers=2, **SIZES)
    ids = _utterances(corpus)
    assert ids == _utterances(other) and len(ids) == 10
    for uid in ids:
        # Digests, not bytes: a failing bytes comparison makes pytest diff megabytes for many minutes.
        digests = [hashlib.sha256((root / uid).with_suffix(".wav").read_bytes()).hexdigest() for root in (corpus, other)]
        assert digests[0] == digests[1], f"{uid}.wav differs between a 1-worker and a 2-worker build"
        np.testing.assert_array_equal(read_video((corpus / uid).with_suffix(".mp4")),
                                      read_video((other / uid).with_suffix(".mp4")))
    for split in ("train", "validation", "test"):
        assert (corpus / "labels" / f"{split}.csv").read_text() == (other / "labels" / f"{split}.csv").read_text()


def test_corpus_resumes_only_missing_utterance(corpus, tmp_path):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(corpus, root)
    victim = _utterances(root)[3]
    wav_bytes = (root / victim).with_suffix(".wav").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.*")}
    for ext in (".wav", ".mp4", ".json"):
        (root / victim).with_suffix(ext).unlink()
    make_corpus(root, seed=3, progress=False, **SIZES)
    assert (root / victim).with_suffix(".wav").read_bytes() == wav_bytes
    rebuilt = [p for p in root.glob("*/*/*.*") if p not in mtimes or p.stat().st_mtime_ns != mtimes[p]]
    assert sorted(rebuilt) == sorted((root / victim).with_suffix(e) for e in (".json", ".mp4", ".wav"))


def test_corpus_refuses_other_parameters_and_detects_half_written(corpus, tmp_path):
    with pytest.raises(ValueError, match="seed"):
        make_corpus(corpus, seed=4, progress=False, **SIZES)
    import shutil

    root = tmp_path / "d"
    shutil.copytree(corpus, root)
    info = json.loads((root / "corpus_info.json").read_text())
    (root / "corpus_info.json").write_text(json.dumps({**info, "complete": False}))
    with pytest.raises(ValueError, match="partly written"):
        load_synthetic(root, "train")


def test_splits_have_disjoint_sentences(corpus):
    texts = {}
    for split in ("train", "validation", "test"):
        with open(corpus / "labels" / f"{split}.csv", newline="") as f:
            texts[split] = [row[4] for row in csv.reader(f)]
    assert {k: len(v) for k, v in texts.items()} == {"train": 6, "validation": 2, "test": 2}
    assert len(set().union(*texts.values())) == 10


def test_load_synthetic_and_decode(corpus):
    ds = load_synthetic(corpus, "train")
    assert set(ds.column_names) == {"id", "audio_path", "video_path", "text", "duration", "num_frames"}
    assert len(ds) == 6 and len(load_synthetic(corpus, "test")) == 2
    for row in ds.select(range(3)):
        meta = json.loads(Path(row["audio_path"]).with_suffix(".json").read_text())
        audio, video = read_audio(row["audio_path"]), read_video(row["video_path"])
        assert audio.dtype == np.float32 and len(audio) == meta["num_samples"]
        # frames cover the audio: ceil(samples / 640) at 25 fps and 16 kHz
        assert video.shape == (math.ceil(len(audio) / 640), 96, 96) == (row["num_frames"], 96, 96)
        assert video.dtype == np.uint8
        assert row["text"] == meta["text"] == " ".join(w for w, *_ in meta["words"])
        assert abs(row["duration"] - len(audio) / 16000) < 0.04


def test_media_errors_name_the_file(corpus, tmp_path):
    good = next(corpus.glob("train/*/*.mp4"))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(good.read_bytes()[:200] + b"\x00garbage" * 50)
    with pytest.raises(MediaError, match="corrupt.mp4"):
        read_video(corrupt)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.wav"):
        read_audio(empty)
    with pytest.raises(MediaError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_read_audio_fixes_up_stereo_and_rate(tmp_path, caplog):
    import soundfile as sf

    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="FLOAT")
    audio = read_audio(tmp_path / "s.wav")
    assert len(audio) == 16000 and audio.dtype == np.float32
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    np.testing.assert_allclose(audio[200:-200], expected[200:-200], atol=1e-3)
    assert "downmixing" in caplog.text and "resampling" in caplog.text


def test_importing_data_does_not_load_espeak():
    code = "import sys, modeling_llama_avsr.data; assert 'espeakng_loader' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_atomic_writes_keep_the_old_file_when_writing_fails(tmp_path):
    from modeling_llama_avsr.data.atomic import atomic_path, write_bytes_atomic

    target = tmp_path / "clip.wav"
    write_bytes_atomic(target, b"first")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".wav" and tmp != target
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav"]  # no temporary left behind
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
