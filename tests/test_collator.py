"""The training collator's augmentation: the reference's audio time masking (count, width, training only)."""

import numpy as np
import soundfile
import torch

from modeling_llama_avsr.data.collator import AVSRDataCollator, time_mask_audio

from tiny import tiny_processor


def zero_runs(audio):
    """(start, length) of each maximal run of zeros."""
    zero = np.concatenate([[False], audio == 0, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(zero))
    return list(zip(edges[::2], edges[1::2] - edges[::2]))


def test_time_mask_audio_follows_the_reference():
    rng = np.random.default_rng(0)
    ones = np.ones(16000, np.float32)
    widths = []
    for _ in range(400):  # 1 s: one mask, a run of at most 0.4 s (6399 samples)
        runs = zero_runs(time_mask_audio(ones, rng))
        assert len(runs) <= 1
        widths += [length for _, length in runs] or [0]
    assert max(widths) < 6400 and max(widths) > 6000
    assert 2800 < np.mean(widths) < 3300  # U{0 .. 6399}, slightly less where a run is cut at the clip's end
    assert ones.min() == 1  # the input is left alone

    # One mask per started second: 1 s + 1 sample has two; masks over 2.5 s never zero more than 3 x 6399 samples.
    assert max(len(zero_runs(time_mask_audio(ones, rng))) for _ in range(200)) == 1
    assert max(len(zero_runs(time_mask_audio(np.ones(16001, np.float32), rng))) for _ in range(400)) == 2
    long = [time_mask_audio(np.ones(40000, np.float32), rng) for _ in range(300)]
    assert max(len(zero_runs(a)) for a in long) == 3 and max(int((a == 0).sum()) for a in long) <= 3 * 6399

    same = [time_mask_audio(ones, np.random.default_rng(7)) for _ in range(2)]  # seeded: reproducible
    np.testing.assert_array_equal(same[0], same[1])


def test_collator_masks_audio_in_training_only_when_asked(tmp_path):
    rows = []
    for i in range(3):
        t = np.arange(int(16000 * (1.2 + 0.3 * i))) / 16000
        path = tmp_path / f"clip{i}.wav"
        soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
        rows.append({"audio_path": str(path), "text": "place blue at f two now"})
    processor = tiny_processor("asr")
    clean = processor(audio=[soundfile.read(row["audio_path"], dtype="float32")[0] for row in rows],
                      text=[row["text"] for row in rows])

    def features(**kwargs):
        return AVSRDataCollator(processor, seed=3, **kwargs)(rows)["input_features"]

    # Evaluation, and training without the flag (the main job's default): the clips as they are.
    for kwargs in ({}, {"audio_time_mask": True}, {"train": True}):
        torch.testing.assert_close(features(**kwargs), clean["input_features"])
    masked = features(train=True, audio_time_mask=True)
    torch.testing.assert_close(masked, features(train=True, audio_time_mask=True))  # the collator's seeded generator
    assert not torch.allclose(masked, clean["input_features"])
    # Zeroed samples give log-mel frames at Whisper's floor (8 below the clip's maximum of log10 power, scaled by 4).
    for b in range(3):
        real = int(clean["feature_attention_mask"][b].sum())
        floor = masked[b, :, :real].max() - 2.0
        silent = (masked[b, :, :real] <= floor + 1e-5).all(0)
        assert silent.sum() > 0 and not (clean["input_features"][b, :, :real] <= floor + 1e-5).all(0).any()
