"""examples/run_avsr.py as a user runs it: a --help that can be read, and evaluation, checkpoints and the final
saves of a short run on the real offline weights."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_avsr.py"
sys.path.insert(0, str(SCRIPT.parent))

import run_avsr  # noqa: E402


def run_script(*args, cwd=None, timeout=1200):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_help_lists_model_and_data_flags_with_help_and_defaults_first():
    for dataclass in (run_avsr.ModelArguments, run_avsr.DataArguments):
        for field in dataclasses.fields(dataclass):
            assert field.metadata.get("help"), f"--{field.name} has no help text"
    result = run_script("--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    sections = [line for line in text.splitlines() if re.match(r"^[a-z].*:$", line)]
    assert sections[1:] == ["model:", "data:",
                            "training (transformers' TrainingArguments, and the Llama-AVSR additions):"], sections
    model_part = text[text.index("\nmodel:\n"):text.index("\ndata:\n")]
    data_part = text[text.index("\ndata:\n"):text.index("\ntraining (")]
    for dataclass, part in ((run_avsr.ModelArguments, model_part), (run_avsr.DataArguments, data_part)):
        for field in dataclasses.fields(dataclass):
            entry = part[part.index(f"  --{field.name} "):]
            entry = entry[: entry.index("\n  --", 1) if "\n  --" in entry[1:] else len(entry)]
            assert "(default:" in entry, entry
    assert text.index("--decorrelation_weight") > text.index("--eval_snr_db")
    assert len(text.splitlines()[0]) < 100  # one usage line, not every flag


def test_eval_strategy_without_a_validation_split_is_refused():
    with pytest.raises(ValueError, match="--eval_strategy steps evaluates during training and needs "
                                         "--validation_split"):
        run_avsr.main(["--dataset", "lrs3", "--data_dir", "/nonexistent", "--eval_strategy", "steps"])


@pytest.mark.slow
def test_short_run_evaluates_keeps_the_best_and_saves_both_kinds(tmp_path, offline_cache_dir):
    # SmolLM2-135M + Whisper tiny.en on a tiny synthetic corpus: validation WER every 2 steps, the best checkpoint
    # reloaded at the end, small checkpoints, and a final full and light save that load to the same transcripts.
    from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
    from modeling_llama_avsr.hub import checkpoint_size

    out = tmp_path / "run"
    summary = run_avsr.main([
        "--data_dir", str(tmp_path / "corpus"), "--num_train", "8", "--num_validation", "4", "--num_test", "4",
        "--corpus_workers", "1", "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--warmup_steps", "0", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_strategy", "steps", "--save_steps", "2", "--load_best_model_at_end", "--generation_max_new_tokens",
        "8", "--logging_steps", "1",
    ])
    assert [log["step"] for log in summary["validation"]] == [2, 4]
    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    small, full = checkpoint_size(checkpoint), checkpoint_size(out / "final")
    light = checkpoint_size(out / "final-light")
    print(f"SIZES checkpoint-2 {small / 1e6:.1f} MB (+ optimizer.pt "
          f"{(checkpoint / 'optimizer.pt').stat().st_size / 1e6:.1f} MB), final full {full / 1e6:.1f} MB, "
          f"final light {light / 1e6:.1f} MB")
    assert small < 0.05 * full and light < 0.05 * full
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    best = min(summary["validation"], key=lambda log: (log["eval_wer"], log["step"]))
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    # The pipeline's default chunk length follows the training clips, recorded with the processor (issue 11).
    from modeling_llama_avsr import LlamaAVSRProcessor
    from modeling_llama_avsr.data import load_synthetic

    durations = load_synthetic(tmp_path / "corpus", "train")["duration"]
    for kind in ("final", "final-light"):
        recorded = LlamaAVSRProcessor.from_pretrained(out / kind).training_clip_seconds
        assert recorded == [round(min(durations), 3), round(max(durations), 3)]
    for kind in ("final", "final-light"):
        model = LlamaAVSRForConditionalGeneration.from_pretrained(out / kind)
        assert model.config.base_components["text_model"] in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
