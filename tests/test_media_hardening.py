"""Bad input: every malformed file gives one MediaError (a ValueError) naming the file, quickly; fix-ups are logged."""

import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("decord")

sys.path.insert(0, str(Path(__file__).parent))
import make_trees  # noqa: E402

from modeling_llama_avsr.data import (  # noqa: E402
    MediaError,
    TranscriptError,
    align_audio_to_video,
    check_transcript,
    probe_media,
    read_audio,
    read_audio_video,
    read_lrs_transcript,
    read_video,
)

RNG = np.random.default_rng(0)
FRAMES = RNG.integers(0, 255, (50, 96, 96, 3), dtype=np.uint8)
AUDIO = (0.1 * RNG.standard_normal(32000)).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import soundfile as sf

    d = tmp_path_factory.mktemp("media")
    make_trees.write_face_mp4(d / "good.mp4", FRAMES, AUDIO)
    make_trees.write_face_mp4(d / "video_only.mp4", FRAMES, None)
    make_trees.write_face_mp4(d / "stereo_44k.mp4", FRAMES, AUDIO, audio_rate=44100, channels=2)
    make_trees.write_face_mp4(d / "tiny.mp4", FRAMES[:, :16, :16], None)
    make_trees.write_face_mp4(d / "long.mp4", np.zeros((25 * 200, 16, 16, 3), np.uint8), None)
    make_trees.write_face_mp4(d / "mismatch.mp4", FRAMES[:10], AUDIO)  # 0.4 s of video, 2 s of audio
    sf.write(d / "good.wav", AUDIO, 16000)
    import soxr

    at_44k = soxr.resample(AUDIO, 16000, 44100, quality="VHQ")
    sf.write(d / "stereo_44k.wav", np.stack([at_44k, -at_44k], 1) * 0.5 + at_44k[:, None] * 0.5, 44100)
    sf.write(d / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    good_wav = (d / "good.wav").read_bytes()
    (d / "truncated.wav").write_bytes(good_wav[: len(good_wav) // 2])
    (d / "header_only.wav").write_bytes(good_wav[:44])
    good_mp4 = (d / "good.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good_mp4[: len(good_mp4) // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "empty.wav").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 20)
    (d / "text.wav").write_text("RIFF? no")
    (d / "random.mp4").write_bytes(RNG.bytes(30000))
    # an audio-only mp4 (AAC, no video stream)
    import av

    with av.open(str(d / "audio_only.mp4"), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        for start in range(0, len(AUDIO), 1024):
            frame = av.AudioFrame.from_ndarray(AUDIO[None, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # mp4 with the moov atom first (faststart), cut in the middle of the media data: headers parse, frames do not
    with av.open(str(d / "faststart.mp4"), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "yuv420p"
        for frame in FRAMES:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = (d / "faststart.mp4").read_bytes()
    (d / "truncated_faststart.mp4").write_bytes(data[: len(data) // 2])
    return d


BAD_VIDEO = {
    "missing.mp4": "does not exist",
    "empty.mp4": "empty",
    "text.mp4": "not a readable media file",
    "random.mp4": "not a readable media file",
    "truncated.mp4": "not a readable media file",
    "truncated_faststart.mp4": "cannot decode video|truncated",
    "audio_only.mp4": "no video stream",
    "good.wav": "no video stream",
    "long.mp4": "longer than max_seconds",
}
BAD_AUDIO = {
    "missing.wav": "does not exist",
    "empty.wav": "empty",
    "empty.mp4": "empty",
    "text.wav": "cannot read audio",
    "text.mp4": "not a readable media file",
    "truncated.wav": "truncated",
    "header_only.wav": "truncated",
    "nan.wav": "NaN",
    "truncated.mp4": "not a readable media file",
    "truncated_faststart.mp4": "no audio track",
    "video_only.mp4": "no audio track",
}


@pytest.mark.parametrize("reader,name,problem", [(read_video, n, p) for n, p in BAD_VIDEO.items()]
                         + [(read_audio, n, p) for n, p in BAD_AUDIO.items()])
def test_bad_media_is_one_clear_error(files, reader, name, problem):
    start = time.perf_counter()
    with pytest.raises(MediaError, match=problem) as info:
        reader(files / name)
    assert str(files / name) in str(info.value) and isinstance(info.value, ValueError)
    assert time.perf_counter() - start < 10


def test_truncated_audio_track_in_faststart_mp4(files, tmp_path):
    """A cut AAC track decodes partly without an FFmpeg error: the header's duration gives it away."""
    import av

    path = tmp_path / "av_faststart.mp4"
    make_trees.write_face_mp4(tmp_path / "plain.mp4", FRAMES, AUDIO)
    with av.open(str(tmp_path / "plain.mp4")) as src, av.open(str(path), "w", format="mp4",
                                                                options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for reader in (read_audio, read_video):
        with pytest.raises(MediaError, match="truncated|cannot decode") as info:
            reader(cut)
        assert str(cut) in str(info.value)


def test_valid_files_and_fix_ups(files, caplog):
    frames = read_video(files / "good.mp4")
    assert frames.shape == (50, 96, 96) and frames.dtype == np.uint8
    assert read_audio(files / "good.wav").shape == (32000,)
    assert abs(len(read_audio(files / "good.mp4")) - 32000) <= 1024  # AAC priming / padding
    with caplog.at_level(logging.WARNING):
        for name in ("stereo_44k.wav", "stereo_44k.mp4"):
            audio = read_audio(files / name)
            assert audio.ndim == 1 and abs(len(audio) - 32000) <= 1024
    assert caplog.text.count("downmixing 2 channels") == 2 and caplog.text.count("from 44100 Hz to 16000 Hz") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiny = read_video(files / "tiny.mp4")  # decord cannot decode frames this narrow; PyAV can
    assert tiny.shape == (50, 16, 16) and "decoding with PyAV" in caplog.text
    with pytest.raises(MediaError, match="smaller than the 88x88 crop") as info:
        read_video(files / "tiny.mp4", min_size=88)
    assert str(files / "tiny.mp4") in str(info.value)
    assert read_video(files / "long.mp4", max_seconds=None).shape == (5000, 16, 16)
    info = probe_media(files / "good.mp4")
    assert (info.has_video, info.has_audio, info.num_frames, info.fps, info.width) == (True, True, 50, 25.0, 96)


def test_audio_video_alignment(files):
    audio, frames = read_audio_video(files / "good.mp4")
    assert len(audio) == len(frames) * 640
    audio, frames = read_audio_video(files / "good.mp4", audio_path=files / "good.wav")
    assert len(audio) == 32000 and len(frames) == 50
    with pytest.raises(MediaError, match="differ by more than") as info:
        read_audio_video(files / "mismatch.mp4")
    assert str(files / "mismatch.mp4") in str(info.value)
    padded = align_audio_to_video(np.ones(31000, np.float32), 50)
    assert len(padded) == 32000 and padded[-1] == 0


def test_transcripts(tmp_path):
    assert check_transcript("  Hello\u00a0  wor\u0301ld ") == "Hello wo\u0155ld"  # NFC, whitespace collapsed
    for bad, problem in [("", "empty"), ("a\x00b", "U+0000"), ("a\ud800b", "U+D800"), ("a\x1bb", "U+001B"),
                         ("x\ue000", "U+E000")]:
        with pytest.raises(TranscriptError, match=re.escape(problem)) as info:
            check_transcript(bad, "clip.txt")
        assert "clip.txt" in str(info.value) and isinstance(info.value, ValueError)
    (tmp_path / "ok.txt").write_text("Text:  HELLO WORLD\nConf:  4\n")
    assert read_lrs_transcript(tmp_path / "ok.txt") == "hello world"
    (tmp_path / "latin1.txt").write_bytes("Text:  CAF\xc9\n".encode("latin-1"))
    (tmp_path / "nolabel.txt").write_text("HELLO\nConf:  4\n")
    for name, problem in [("latin1.txt", "not UTF-8"), ("nolabel.txt", "without a `Text:` line"),
                          ("absent.txt", "cannot read")]:
        with pytest.raises(TranscriptError, match=problem):
            read_lrs_transcript(tmp_path / name)
