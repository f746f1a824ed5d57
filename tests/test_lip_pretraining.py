"""The lip-encoder pretraining of examples/pretrain_lip_encoder.py: frame labels and the collator."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from pretrain_lip_encoder import VisemeCollator, frame_visemes  # noqa: E402

from modeling_llama_avsr import LlamaAVSRProcessor  # noqa: E402
from modeling_llama_avsr.data import load_synthetic, make_corpus  # noqa: E402
from modeling_llama_avsr.data.mouth import VISEMES  # noqa: E402


def test_frame_visemes_follow_the_phoneme_timing():
    record = {"fps": 25, "visemes": [["PP", 0.0, 0.1], ["aa", 0.1, 0.26], ["DD", 0.26, 0.3]]}
    labels = frame_visemes(record, 10)
    # Frame f shows time (f + 0.5) / 25: 0.02, 0.06 -> PP; 0.10 .. 0.22 -> aa; 0.26 -> DD; later frames -> sil.
    expected = ["PP", "PP", "aa", "aa", "aa", "aa", "DD", "sil", "sil", "sil"]
    assert [VISEMES[i] for i in labels] == expected


def test_viseme_collator_on_corpus_clips(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", num_train=3, num_validation=1, num_test=1, seed=5, progress=False)
    rows = list(load_synthetic(corpus, "train"))
    processor = LlamaAVSRProcessor.from_components(text_model="smollm2-135m", modality="vsr")
    batch = VisemeCollator(processor)(rows)
    frames = [json.loads(Path(r["video_path"]).with_suffix(".json").read_text())["num_frames"] for r in rows]
    assert batch["pixel_values_videos"].shape == (3, 1, max(frames), 88, 88)
    assert batch["attention_mask"].sum(1).tolist() == frames
    for i, n in enumerate(frames):
        record = json.loads(Path(rows[i]["video_path"]).with_suffix(".json").read_text())
        assert torch.equal(batch["labels"][i, :n], torch.from_numpy(frame_visemes(record, n)))
        assert (batch["labels"][i, n:] == -100).all()
    # Evaluation batches are deterministic (no random crop or masking); training ones are augmented.
    again = VisemeCollator(processor)(rows)
    assert torch.equal(batch["pixel_values_videos"], again["pixel_values_videos"])
    augmented = VisemeCollator(processor, train=True, seed=1)(rows)
    assert not torch.equal(batch["pixel_values_videos"], augmented["pixel_values_videos"])
    assert np.isfinite(augmented["pixel_values_videos"].numpy()).all()


@pytest.mark.slow
def test_pretrain_script_saves_an_encoder_that_llama_avsr_loads_frozen(tmp_path):
    from pretrain_lip_encoder import main

    from modeling_llama_avsr import AVHubertModel, LlamaAVSRForConditionalGeneration

    corpus = make_corpus(tmp_path / "corpus", num_train=4, num_validation=2, num_test=1, seed=6, progress=False)
    out = tmp_path / "lip"
    metrics = main([
        "--data_dir", str(corpus), "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--num_train", "4", "--num_validation", "2", "--num_test", "1",
        "--corpus_seed", "6", "--disable_tqdm", "true",
    ])
    report = json.loads((out / "final" / "pretraining.json").read_text())
    assert 0.0 <= report["validation_frame_accuracy"] <= 1.0
    assert report["validation_frame_accuracy"] == metrics["eval_frame_accuracy"]

    encoder = AVHubertModel.from_pretrained(out / "final")
    model = LlamaAVSRForConditionalGeneration.from_components(
        text_model="smollm2-135m", audio_encoder="whisper-tiny.en", video_encoder=str(out / "final"), modality="avsr",
    )
    video_encoder = model.model.video_encoder
    assert not any(p.requires_grad for p in video_encoder.parameters())  # a given encoder is frozen, like AV-HuBERT
    for (name, a), b in zip(encoder.state_dict().items(), video_encoder.state_dict().values()):
        assert torch.equal(a, b), name
