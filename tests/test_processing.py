import numpy as np
import pytest
import torch

from modeling_llama_avsr import LlamaAVSRProcessor
from modeling_llama_avsr.configuration_llama_avsr import compressed_length

from tiny import random_clips, tiny_processor


def test_sequence_layout_and_labels():
    processor = tiny_processor("avsr", audio_rate=4, video_rate=2)
    (audio, video), = random_clips(1, seconds=(1.0, 1.0))
    out = processor(audio=[audio], videos=[video], text=["place blue at f two now"])
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    t, tok = processor.token_ids, processor.tokenizer
    n_audio = compressed_length(compressed_length(16000 // 160, 2), 4)  # 100 mel frames -> 50 -> 13
    n_video = compressed_length(25, 2)
    expected_prefix = (
        [tok.bos_token_id, t["audio_start_token_id"]] + [t["audio_token_id"]] * n_audio + [t["audio_end_token_id"]]
        + [t["video_start_token_id"]] + [t["video_token_id"]] * n_video + [t["video_end_token_id"]]
        + tok("transcribe speech to text .", add_special_tokens=False)["input_ids"]
    )
    target = tok("place blue at f two now", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == expected_prefix + target
    assert labels == [-100] * len(expected_prefix) + target
    assert out["pixel_values_videos"].shape == (1, 25, 88, 88)
    assert out["input_features"].shape == (1, 80, 3000)


def test_video_normalisation_and_crop():
    processor = tiny_processor("vsr")
    video = np.zeros((3, 96, 100, 3), dtype=np.uint8)
    video[:, 4:92, 6:94] = (255, 255, 255)  # the centre 88x88 is white, the border black
    out = processor(videos=[video])
    pixels = out["pixel_values_videos"][0]
    white = (1.0 - 0.421) / 0.165
    torch.testing.assert_close(pixels, torch.full_like(pixels, white), atol=1e-3, rtol=0)


def test_left_padding_and_masks():
    processor = tiny_processor("avsr")
    clips = random_clips(2, seconds=(0.5, 1.5))
    out = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips])
    mask = out["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    for i, (audio, video) in enumerate(clips):
        assert out["video_attention_mask"][i].sum() == len(video)
        assert out["feature_attention_mask"][i].sum() == int(np.ceil(len(audio) / 160))
        assert (out["input_ids"][i] == processor.token_ids["video_token_id"]).sum() == compressed_length(len(video), 2)
    assert "labels" not in out


@pytest.mark.parametrize(
    "audio,video,message",
    [
        (np.zeros(0, np.float32), None, "empty"),
        (np.zeros((2, 1600), np.float32), None, "mono"),
        (np.zeros(31 * 16000, np.float32), None, "30 s"),
        (np.full(1600, np.nan, np.float32), None, "NaN"),
        (None, np.zeros((0, 96, 96), np.uint8), "no frames"),
        (None, np.zeros((5, 60, 60), np.uint8), "smaller than"),
    ],
)
def test_bad_media_gets_a_clear_error(audio, video, message):
    processor = tiny_processor("asr" if audio is not None else "vsr")
    with pytest.raises(ValueError, match=message):
        processor(audio=[audio] if audio is not None else None, videos=[video] if video is not None else None)


def test_wrong_sampling_rate_is_refused():
    processor = tiny_processor("asr")
    with pytest.raises(ValueError, match="16000 Hz"):
        processor(audio=[np.zeros(8000, np.float32)], sampling_rate=8000)


def test_unencodable_transcript_is_refused():
    processor = tiny_processor("asr")
    (audio, _), = random_clips(1)
    with pytest.raises(ValueError, match="cannot encode"):
        processor(audio=[audio], text=["place zebra now"])


def test_save_load_round_trip(tmp_path):
    processor = tiny_processor("avsr", audio_rate=3, video_rate=5)
    processor.save_pretrained(tmp_path)
    loaded = LlamaAVSRProcessor.from_pretrained(tmp_path)
    assert (loaded.modality, loaded.prompt, loaded.audio_compression_rate, loaded.video_compression_rate) == (
        "avsr", "transcribe speech to text .", 3, 5,
    )
    clips = random_clips(2)
    kwargs = dict(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=["place blue", "red green"])
    a, b = processor(**kwargs), loaded(**kwargs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_trimmed_window_keeps_real_frames_and_token_counts():
    full = tiny_processor("asr")
    trimmed = tiny_processor("asr")
    trimmed.audio_window = "trimmed"
    clips = [a for a, _ in random_clips(2, seconds=(0.5, 1.5))]
    a, b = full(audio=clips), trimmed(audio=clips)
    # The longest clip's frames, the extractor's one beyond them, and 0.5 s of silence.
    assert b["input_features"].shape[-1] == -(-max(len(c) for c in clips) // 160) + 1 + 50
    for i, clip in enumerate(clips):
        frames = int(b["feature_attention_mask"][i].sum())
        assert frames == int(a["feature_attention_mask"][i].sum())
        torch.testing.assert_close(b["input_features"][i, :, :frames], a["input_features"][i, :, :frames])
    torch.testing.assert_close(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize(
    "dtype,scale,offset",
    [(np.int16, 32768, 0), (np.int32, 2**31, 0), (np.int8, 128, 0), (np.uint8, 128, 128)],
)
def test_integer_pcm_is_scaled_by_its_range(dtype, scale, offset):
    # The same clip as float and as integer PCM (an int16 wav read without dtype=float) gives the same features.
    processor = tiny_processor("asr")
    info = np.iinfo(dtype)
    pcm = np.random.default_rng(0).integers(info.min, int(info.max) + 1, size=8000).astype(dtype)
    expected = (pcm.astype(np.float64) - offset) / scale
    from modeling_llama_avsr.processing_llama_avsr import as_float_audio

    np.testing.assert_allclose(as_float_audio(pcm), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(processor(audio=[pcm])["input_features"],
                               processor(audio=[expected.astype(np.float32)])["input_features"])


@pytest.mark.parametrize(
    "audio,message",
    [
        (np.array([0.1, np.inf, np.nan, 0.2], np.float32), "2 NaN or infinite samples"),
        (np.zeros((16000, 2), np.float32), r"shape \(16000, 2\).*mix the channels"),
        (np.zeros((), np.float32), r"shape \(\)"),
        (np.zeros(100, bool), "dtype bool"),
        (np.zeros(100, complex), "dtype complex"),
        (np.array(["a", "b"]), "dtype <U1"),
        (np.zeros(0, np.int16), "empty"),
    ],
)
def test_bad_audio_arrays_say_what_was_given(audio, message):
    with pytest.raises(ValueError, match=f"audio clip 0 .*{message}"):
        tiny_processor("asr")(audio=[audio])


@pytest.mark.parametrize(
    "video,message",
    [
        (np.full((3, 96, 96), np.nan, np.float32), "NaN or infinite"),
        (np.full((3, 96, 96), 300.0, np.float32), r"0\.\.255.*got 300\.\.300"),
        (np.zeros((3, 96, 96, 4), np.uint8), r"shape \(3, 96, 96, 4\)"),
        (np.zeros((96, 96), np.uint8), r"shape \(96, 96\)"),
        (np.zeros((3, 96, 96), bool), "dtype bool"),
    ],
)
def test_bad_video_arrays_say_what_was_given(video, message):
    with pytest.raises(ValueError, match=f"video 0 .*{message}"):
        tiny_processor("vsr")(videos=[video])


def test_float_frames_in_0_255_equal_uint8():
    processor = tiny_processor("vsr")
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 96, 96), dtype=np.uint8)
    torch.testing.assert_close(processor(videos=[frames.astype(np.float32)])["pixel_values_videos"],
                               processor(videos=[frames])["pixel_values_videos"])


def test_training_clip_seconds_is_saved_and_checked(tmp_path):
    processor = tiny_processor("asr")
    assert processor.training_clip_seconds is None
    processor.training_clip_seconds = [1.32, 3.04]
    processor.save_pretrained(tmp_path)
    assert LlamaAVSRProcessor.from_pretrained(tmp_path).training_clip_seconds == [1.32, 3.04]
    with pytest.raises(ValueError, match="shortest, longest"):
        LlamaAVSRProcessor(feature_extractor=processor.feature_extractor, tokenizer=processor.tokenizer,
                           training_clip_seconds=[3.0, 1.0])


def test_original_settings_survive_save_and_load(tmp_path):
    processor = tiny_processor("avsr", partial_window="drop", transcript_leading_space=False)
    processor.save_pretrained(tmp_path / "original")
    loaded = LlamaAVSRProcessor.from_pretrained(tmp_path / "original")
    assert loaded.partial_window == "drop" and loaded.transcript_leading_space is False
    tiny_processor("avsr").save_pretrained(tmp_path / "defaults")
    defaults = LlamaAVSRProcessor.from_pretrained(tmp_path / "defaults")
    assert defaults.partial_window == "keep" and defaults.transcript_leading_space is True
    with pytest.raises(ValueError, match="partial_window"):
        tiny_processor("avsr", partial_window="floor")


def test_partial_window_token_counts():
    clips = random_clips(3, seed=2, seconds=(0.5, 1.5))
    audio, videos = [a for a, _ in clips], [v for _, v in clips]
    for rule, rounding in (("keep", np.ceil), ("drop", np.floor)):
        processor = tiny_processor("avsr", 4, 3, partial_window=rule)
        ids = processor(audio=audio, videos=videos)["input_ids"]
        for i, (clip, video) in enumerate(clips):
            encoder_frames = int(np.ceil(np.ceil(len(clip) / 160) / 2))  # 10-ms mel hop, then a stride-2 conv
            n_audio = int((ids[i] == processor.token_ids["audio_token_id"]).sum())
            n_video = int((ids[i] == processor.token_ids["video_token_id"]).sum())
            assert (n_audio, n_video) == (int(rounding(encoder_frames / 4)), int(rounding(len(video) / 3))), rule
    # With "drop", a clip shorter than one window would give no token at all: refused.
    with pytest.raises(ValueError, match="video 0 gives 2 encoder frames, fewer than the compression rate 3"):
        tiny_processor("vsr", 4, 3, partial_window="drop")(videos=[videos[0][:2]])


def byte_level_tokenizer():
    """A small byte-level BPE (as Llama 3's and SmolLM2's are): a word's first piece differs with a leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tiny import WORDS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(WORDS), " ".join(reversed(WORDS))] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_transcript_tokenised_bare_as_the_original_or_after_a_space():
    (audio, _), = random_clips(1)
    transcript = "place blue at f two now"
    for leading_space, tokenised in ((True, " " + transcript), (False, transcript)):
        tokenizer = byte_level_tokenizer()
        processor = tiny_processor("asr", tokenizer=tokenizer, transcript_leading_space=leading_space)
        labels = processor(audio=[audio], text=[transcript])["labels"][0]
        # What the tokenizer itself makes of the text (the original calls it on the bare transcript), then EOS.
        expected = tokenizer(tokenised, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != -100].tolist() == expected
    assert tokenizer(transcript)["input_ids"][0] != tokenizer(" " + transcript)["input_ids"][0]
