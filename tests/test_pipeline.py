"""The "audio-visual-speech-recognition" pipeline and `llama-avsr transcribe`, on tiny random models and media files
written here (mouth-ROI mp4 with and without an audio track, wav)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import pipeline

from modeling_llama_avsr import AudioVisualSpeechRecognitionPipeline, LlamaAVSRForConditionalGeneration
from modeling_llama_avsr.pipeline_llama_avsr import (
    add_transcribe_arguments,
    chunk_boundaries,
    refine_voiced_span,
    run_transcribe,
    voiced_frames,
)

from tiny import random_clips, tiny_config, tiny_processor, tiny_tokenizer

TASK = "audio-visual-speech-recognition"
GENERATE = dict(max_new_tokens=4, min_new_tokens=4)


def build(modality):
    tokenizer = tiny_tokenizer()
    model = LlamaAVSRForConditionalGeneration(tiny_config(modality, tokenizer=tokenizer)).eval()
    return model, tiny_processor(modality, tokenizer=tokenizer)


def generate_text(model, processor, audio=None, video=None):
    inputs = processor(audio=None if audio is None else [audio], videos=None if video is None else [video])
    out = model.generate(**inputs, **GENERATE, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :])[0]


def write_mp4(path, frames, audio=None):
    """Grayscale frames (T, H, W) at 25 fps as h264, with a 16 kHz AAC track when `audio` is given."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        audio_stream = container.add_stream("aac", rate=16000) if audio is not None else None
        if audio_stream is not None:
            audio_stream.layout = "mono"
        for frame in frames:
            rgb = np.repeat(frame[..., None], 3, axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            samples = (np.clip(audio, -1, 1) * 32767).astype(np.int16)[None, :]
            audio_frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            audio_frame.sample_rate = 16000
            for packet in audio_stream.encode(audio_frame):
                container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    clips = random_clips(3, seed=4, seconds=(0.8, 1.2))
    files = {}
    for i, (audio, video) in enumerate(clips):
        # Smooth frames survive lossless h264's yuv420 round trip almost exactly.
        video = np.clip(np.linspace(40, 200, 96)[None, None, :] + 20 * np.sin(np.arange(len(video)))[:, None, None],
                        0, 255).astype(np.uint8).repeat(96, axis=1)
        write_mp4(root / f"lips{i}.mp4", video)  # no audio track: the mouth-ROI layout
        sf.write(root / f"lips{i}.wav", audio, 16000)  # ... with its wav next to it
        write_mp4(root / f"av{i}.mp4", video, audio)  # an mp4 with its own audio track
        files[i] = (audio, video)
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "text.wav").write_text("not audio at all\n" * 100)
    full = (root / "av0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    return root, files


def test_task_is_registered_and_matches_generate_for_each_modality(media):
    root, _ = media
    from modeling_llama_avsr.data import read_audio, read_audio_video, read_video

    wav, mp4 = root / "lips0.wav", root / "lips0.mp4"
    aligned = read_audio_video(mp4, wav)  # with both files, audio is cut or padded to the video, as in training
    for modality, source, (audio, video) in (
        ("asr", str(wav), (read_audio(wav), None)),
        ("vsr", str(mp4), (None, read_video(mp4))),
        ("avsr", {"audio": wav, "video": mp4}, aligned),
    ):
        model, processor = build(modality)
        pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
        assert isinstance(pipe, AudioVisualSpeechRecognitionPipeline)
        assert pipe(source) == {"text": generate_text(model, processor, audio, video)}, modality


def test_mp4_audio_track_sibling_wav_and_arrays(media):
    root, files = media
    model, processor = build("avsr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    from modeling_llama_avsr.data import read_audio_video

    audio, frames = read_audio_video(root / "av1.mp4")
    assert pipe(str(root / "av1.mp4"))["text"] == generate_text(model, processor, audio, frames)
    audio, frames = read_audio_video(root / "lips1.mp4", root / "lips1.wav")
    assert pipe(str(root / "lips1.mp4"))["text"] == generate_text(model, processor, audio, frames)
    assert pipe({"audio": audio, "video": frames})["text"] == generate_text(model, processor, audio, frames)


def test_batching_equals_one_by_one_and_generate_kwargs_pass_through(media):
    root, _ = media
    model, processor = build("avsr")
    pipe = pipeline(TASK, model=model, processor=processor)
    inputs = [str(root / f"av{i}.mp4") for i in range(3)]
    single = pipe(inputs, batch_size=1, **GENERATE)
    batched = pipe(inputs, batch_size=2, **GENERATE)
    assert single == batched and all(r["text"] is not None for r in single)
    from modeling_llama_avsr.data import read_audio_video

    audio, video = read_audio_video(inputs[0])
    direct = processor(audio=[audio], videos=[video])
    out = model.generate(**direct, max_new_tokens=7, min_new_tokens=7, num_beams=2,
                         pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.batch_decode(out[:, direct["input_ids"].shape[1] :])[0]
    assert pipe(inputs[0], max_new_tokens=7, min_new_tokens=7, num_beams=2)["text"] == expected
    with pytest.raises(TypeError, match="Unknown arguments"):
        pipe(inputs[0], max_new_tokenz=3)


def test_long_input_is_chunked_at_quiet_points():
    rng = np.random.default_rng(0)
    speech = lambda s: (0.3 * rng.standard_normal(int(s * 16000))).astype(np.float32)  # noqa: E731
    silence = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    audio = np.concatenate([speech(27), silence(0.4), speech(20), silence(0.2), speech(14)])  # 61.6 s
    frames = -(-len(audio) // 640)
    bounds = chunk_boundaries(frames, audio, chunk_frames=30 * 25, search_frames=5 * 25)
    assert bounds[0][0] == 0 and bounds[-1][1] == frames and all(e - s <= 750 for s, e in bounds)
    assert 27 * 25 < bounds[0][1] <= 27.4 * 25 + 1  # inside the first pause
    assert len(bounds) == 3
    # Video-only input: fixed cuts.
    assert chunk_boundaries(1600, None, 750, 125) == [(0, 750), (750, 1500), (1500, 1600)]

    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    result = pipe(audio, chunk_length_s=30, return_timestamps=True)
    assert len(result["chunks"]) == 3
    assert result["text"] == " ".join(c["text"] for c in result["chunks"])
    assert result["chunks"][0]["timestamp"][0] == 0 and result["chunks"][-1]["timestamp"][1] == 61.6
    assert pipe(audio, chunk_length_s=30, return_chunks=True) == result  # the old name
    with pytest.raises(ValueError, match="at most 30"):
        pipe(audio, chunk_length_s=40)


def test_bad_files_name_themselves_and_report_mode_keeps_going(media):
    root, _ = media
    model, processor = build("avsr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    bad = ["empty.mp4", "garbage.mp4", "truncated.mp4", "missing.mp4"]
    for name in bad:
        with pytest.raises(ValueError, match=name):
            pipe(str(root / name))
    mixed = [str(root / "av0.mp4"), *(str(root / n) for n in bad), str(root / "av1.mp4")]
    results = pipe(mixed, batch_size=2, on_error="report")
    assert results[0] == pipe(mixed[0]) and results[-1] == pipe(mixed[-1])
    for name, result in zip(bad, results[1:-1]):
        assert result["text"] is None and name in result["error"]
    asr, asr_processor = build("asr")
    asr_pipe = pipeline(TASK, model=asr, processor=asr_processor, **GENERATE)
    with pytest.raises(ValueError, match="text.wav"):
        asr_pipe(str(root / "text.wav"))
    vsr, vsr_processor = build("vsr")
    with pytest.raises(ValueError, match="needs mouth video"):
        pipeline(TASK, model=vsr, processor=vsr_processor)(str(root / "lips0.wav"))


def test_processor_must_match_the_model():
    model, _ = build("avsr")
    with pytest.raises(ValueError, match="modality"):
        pipeline(TASK, model=model, processor=tiny_processor("asr"))


def test_saved_folder_dtype_and_cli(media, tmp_path, capsys):
    import argparse

    root, _ = media
    model, processor = build("avsr")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    pipe = pipeline(TASK, model=str(tmp_path / "model"), dtype=torch.bfloat16, device="cpu")
    assert pipe.model.dtype == torch.bfloat16 and pipe(str(root / "av0.mp4"))["text"] is not None

    parser = argparse.ArgumentParser()
    add_transcribe_arguments(parser)
    files = [str(root / "av0.mp4"), str(root / "garbage.mp4"), str(root / "av1.mp4")]
    args = parser.parse_args([*files, "--model", str(tmp_path / "model"), "--batch-size", "2", "--json",
                              "--max-new-tokens", "3"])
    assert run_transcribe(args) == 1  # one file failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == files
    assert lines[0]["text"] is not None and lines[0]["error"] is None and lines[1]["error"] and "garbage.mp4" in lines[1]["error"]


def test_example_script_runs(media, tmp_path):
    root, _ = media
    model, processor = build("asr")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "examples/transcribe.py", str(root / "lips0.wav"), "--model", str(tmp_path),
         "--max-new-tokens", "2"],
        capture_output=True, text=True, timeout=120, cwd=__file__.rsplit("/tests/", 1)[0],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(root / "lips0.wav") + "\t")


# ---- no speech, inputs checked at the door, long recordings, the other task, the command line ------------------


def noise(seconds, dbfs, seed=0):
    """White noise whose RMS level is `dbfs` dB below full scale."""
    return (10 ** (dbfs / 20) * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def test_silence_faint_noise_and_tiny_clips_give_no_text():
    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)  # min_new_tokens: the model always talks
    for audio in (np.zeros(32000, np.float32), noise(2, -60), noise(0.1, -20), noise(10 / 16000, -20),
                  np.concatenate([np.zeros(16000, np.float32), noise(0.15, -20), np.zeros(16000, np.float32)])):
        assert pipe(audio) == {"text": ""}, len(audio)
    assert pipe(noise(1, -45))["text"] != ""  # above the -50 dBFS threshold: transcribed
    assert pipe(noise(2, -60), vad_threshold_db=None)["text"] != ""  # the check turned off
    # In a long recording only the pieces with speech are transcribed; silent ones leave no chunk.
    long = np.concatenate([noise(8, -20), np.zeros(12 * 16000, np.float32), noise(8, -20, seed=1)])
    result = pipe(long, chunk_length_s=10, return_timestamps=True)
    assert [c["timestamp"] for c in result["chunks"]] == [(0.0, 8.0), (20.0, 28.0)]


def test_voiced_span_edges_are_placed_to_5_ms():
    # A sound from sample 10,400 to 30,130 (not on the 320-sample frame grid), silence around it. The frames that
    # the onset and the offset straddle hold too little of it to reach -50 dBFS, so frame edges cut into the sound.
    audio = np.zeros(36000, np.float32)
    audio[10400:30130] = noise((30130 - 10400) / 16000, -48)
    voiced = np.flatnonzero(voiced_frames(audio))
    assert voiced[0] * 320 > 10400 and (voiced[-1] + 1) * 320 < 30130
    start, end = refine_voiced_span(audio, int(voiced[0]), int(voiced[-1]))
    assert 10400 - 80 < start <= 10400 + 80 and 30130 - 80 <= end < 30130 + 80
    # A cut piece is trimmed to those edges: here the second of two sounds, after a pause.
    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    long = np.concatenate([noise(1.5, -20), np.zeros(8000, np.float32), audio])
    pieces = list(pipe.preprocess(long, chunk_length_s=2.5))
    assert len(pieces) == 2
    assert abs(pieces[1]["start"] - (32000 + 10400) / 16000) <= 0.005
    assert abs(pieces[1]["end"] - (32000 + 30130) / 16000) <= 0.005
    assert abs(len(pieces[1]["audio"]) - (30130 - 10400)) <= 160


def test_integer_pcm_is_scaled_and_bad_arrays_are_refused_at_the_door():
    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    audio = noise(1, -20)
    pcm = np.round(audio * 32767).astype(np.int16)
    assert pipe(pcm) == pipe(pcm.astype(np.float32) / 32768)
    assert pipe({"raw": pcm, "sampling_rate": 16000}) == pipe(pcm)
    resampled = pipe({"raw": pcm[::2], "sampling_rate": 8000})["text"]
    assert resampled == pipe({"raw": pcm[::2].astype(np.float32) / 32768, "sampling_rate": 8000})["text"]
    for bad, message in (
        (np.stack([audio, audio], axis=1), r"shape \(16000, 2\)"),
        (np.array([0.1, np.nan, 0.2], np.float32), "1 NaN or infinite"),
        (np.zeros(0, np.float32), "empty"),
        (audio > 0, "dtype bool"),
        ({"raw": audio, "sampling_rate": -8000}, "sampling_rate must be a positive number"),
    ):
        with pytest.raises(ValueError, match=message):
            pipe(bad)
    reported = pipe([np.zeros((4, 2), np.float32), audio], on_error="report")
    assert reported[0]["text"] is None and "<audio array>: audio must be mono" in reported[0]["error"]
    assert reported[1] == pipe(audio)
    vsr, vsr_processor = build("vsr")
    vsr_pipe = pipeline(TASK, model=vsr, processor=vsr_processor, **GENERATE)
    with pytest.raises(ValueError, match="NaN or infinite pixel"):
        vsr_pipe(np.full((10, 96, 96), np.nan, np.float32))


def speech_like(pieces, seed=0):
    """Bursts of noise at -20 dBFS (seconds > 0) and silences (seconds < 0), as one array."""
    parts = [noise(s, -20, seed + i) if s > 0 else np.zeros(int(-s * 16000), np.float32) for i, s in enumerate(pieces)]
    return np.concatenate(parts)


def test_default_chunk_length_follows_the_training_clips_and_long_pieces_warn(caplog):
    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    assert pipe.default_chunk_length_s == 10.0  # nothing recorded: the documented default
    processor.training_clip_seconds = [1.0, 2.0]
    assert pipe.default_chunk_length_s == 2.5  # the longest clip and room for the pauses around it
    # Bursts of 1.2-1.6 s: any two would fit in 2.5 s only without their pause; every piece is one burst, its
    # timestamps the burst's span.
    audio = speech_like([1.5, -0.3, 1.2, -0.3, 1.6, -0.3, 1.4])
    result = pipe(audio, return_timestamps=True)
    assert [c["timestamp"] for c in result["chunks"]] == [(0.0, 1.5), (1.8, 3.0), (3.3, 4.9), (5.2, 6.6)]
    # Pauses of 0.15 s are found too, and a long input is cut at every pause (a piece of at least 1 s each side).
    audio = speech_like([1.1, -0.15, 1.0, -0.15, 1.1, 0.5])
    assert [c["timestamp"] for c in pipe(audio, return_timestamps=True)["chunks"]] == [
        (0.0, 1.1), (1.25, 2.25), (2.4, 4.0)]  # the bursts' own spans, to 5 ms
    assert "trained on clips of at most" not in caplog.text
    with caplog.at_level("WARNING"):
        pipe(audio, chunk_length_s=6)
    assert "trained on clips of at most 2.0 s" in caplog.text


def test_overlapping_pieces_are_merged():
    from modeling_llama_avsr.pipeline_llama_avsr import merge_overlapping

    assert merge_overlapping(["a b c d", "c d e f", "f g"]) == [
        ("a", 0), ("b", 0), ("c", 0), ("d", 1), ("e", 1), ("f", 1), ("g", 2)]
    assert merge_overlapping(["a b x", "y c d"]) == [("a", 0), ("b", 0), ("x", 0), ("y", 1), ("c", 1), ("d", 1)]
    assert merge_overlapping(["a b c", "c d"], overlapping=False) == [
        ("a", 0), ("b", 0), ("c", 0), ("c", 1), ("d", 1)]
    assert merge_overlapping(["", "a b", ""]) == [("a", 1), ("b", 1)]

    model, processor = build("asr")
    pipe = pipeline(TASK, model=model, processor=processor, **GENERATE)
    audio = speech_like([1.5, -0.3, 1.2, -0.3, 1.6, -0.3, 1.4])
    items = list(pipe.preprocess(audio, chunk_length_s=2.8, stride_length_s=(0.2, 0.4)))
    assert len(items) > 1 and all(len(item["audio"]) <= 2.8 * 16000 for item in items)
    for before, after in zip(items, items[1:]):  # neighbours share 0.2 + 0.4 s
        np.testing.assert_array_equal(before["audio"][-9600:], after["audio"][:9600])
    assert sum(len(item["audio"]) for item in items) == len(audio) + 9600 * (len(items) - 1)
    result = pipe(audio, chunk_length_s=2.6, stride_length_s=0.4, return_timestamps=True)
    assert result["text"] == " ".join(c["text"] for c in result["chunks"])
    with pytest.raises(ValueError, match="shorter than chunk_length_s"):
        pipe(audio, chunk_length_s=2.0, stride_length_s=1.0)
    with pytest.raises(ValueError, match="no word or character timings"):
        pipe(audio, return_timestamps="word")


def test_the_asr_task_names_the_right_one(tmp_path):
    model, processor = build("asr")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r'pipeline\("audio-visual-speech-recognition"'):
        pipeline("automatic-speech-recognition", model=str(tmp_path))
    # and the package's own task still loads the same folder
    assert pipeline(TASK, model=str(tmp_path), **GENERATE)(noise(1, -20))["text"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model", "{missing}"], "no such folder"),
        (["--model", "{model}", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--model", "{model}", "--device", "cuda"], "CUDA is not available"),
        (["--model", "{model}", "--device", "gpu7"], "is not a device"),
        (["--model", "{model}", "--chunk-length", "45"], "--chunk-length must be in"),
        (["--model", "{empty}"], "not a saved model folder"),
    ],
)
def test_cli_reports_user_errors_in_one_line(flags, message, media, tmp_path_factory, capsys):
    from modeling_llama_avsr.cli import main

    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("CUDA is available here")
    root, _ = media
    model_dir = root / "cli_model"
    if not model_dir.exists():
        model, processor = build("asr")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    (root / "empty_dir").mkdir(exist_ok=True)
    paths = {"missing": str(root / "no_such_model"), "model": str(model_dir), "empty": str(root / "empty_dir")}
    capsys.readouterr()
    status = main(["transcribe", str(root / "lips0.wav"), *[f.format(**paths) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("llama-avsr transcribe: error: ") and message in err[0], err
