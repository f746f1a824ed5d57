"""The shipped run_avsr.py configs parse into its three dataclasses with the values their recipe names."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_avsr(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    # The recipes are for GPUs (bf16): TrainingArguments refuses bf16 where no GPU supports it, as on the test machine.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    import run_avsr

    yield run_avsr
    sys.modules.pop("run_avsr", None)


def test_paper_recipe_parses_with_the_papers_values(run_avsr):
    model, data, training = run_avsr.parse_args([str(ROOT / "examples/configs/paper_llama3.2-3b_avsr.json")])
    assert (model.text_model, model.audio_encoder) == ("meta-llama/Llama-3.2-3B", "openai/whisper-medium.en")
    assert model.video_encoder == "avhubert-large"  # convert_avhubert_fairseq("large_vox_iter5.pt", "avhubert-large")
    assert (model.modality, model.compression_type) == ("avsr", "avg")
    assert (model.audio_compression_rate, model.video_compression_rate) == (16, 5)
    assert model.lora_rank == 96 and model.lora_alpha / model.lora_rank == 0.125
    assert model.projector_hidden_size == 2048 and model.projector_layer_norm
    assert model.audio_window == "full"  # Whisper's 30-s window
    assert data.dataset == "lrs2" and data.train_noise == "babble" and data.audio_time_mask
    assert training.learning_rate == 1e-3 and (training.adam_beta1, training.adam_beta2) == (0.9, 0.98)
    assert training.weight_decay == 0.1 and training.lr_scheduler_type == "cosine"
    assert training.optim.startswith("adamw") and training.max_grad_norm == 10.0 and training.num_train_epochs == 10
    assert training.bf16 and training.max_frames_per_batch == 1000
    assert training.decorrelation_weight == 1e4
    assert (training.decorrelation_layers, training.decorrelation_tokens) == ("reference", "prefix")
    assert training.generation_num_beams == 15 and training.generation_max_new_tokens == 32
