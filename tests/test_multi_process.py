"""Several processes through accelerate, on the CPU: `accelerate launch --config_file examples/accelerate/X.yaml`
with 2 gloo processes (the YAMLs are the GPU ones; only --num_processes 2 --mixed_precision no is given on the
command line), each compared with one process or with an uninterrupted run.

- ddp.yaml: gradients and logged losses of 2 processes x batch b equal 1 process x batch 2b (CE and decorrelation);
  max-frames batches dealt out without overlap, covering each epoch; evaluation and prediction over an odd number of
  utterances count every utterance once (WER, CE, decorrelation, the predicted rows); a light checkpoint written by
  one process resumes both to the uninterrupted losses and data order (inside an epoch, with max-frames batches).
- fsdp.yaml: the same gradient and evaluation equalities with the LLM's decoder layers sharded by FSDP2 and the
  encoders ignored (replicated). accelerate runs FSDP on accelerator devices only: on a CPU its state becomes
  MULTI_CPU and drops the FSDP plugin, so Trainer would silently run DDP. `force_fsdp` puts accelerate's own plugin,
  built from the environment that `accelerate launch` derives from fsdp.yaml, back in place; the sharding itself is
  accelerate's `fsdp2_prepare_model` and torch's `fully_shard`, which run on the CPU with gloo.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from test_trainer import TARGETS, Clips, StepCounter, make_trainer

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
CONFIGS = REPO / "examples" / "accelerate"
# NVLink multicast stays off wherever processes are started (it can take a shared host's GPUs down).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# Max-frames data: 8 clips whose lengths fill 6 batches of 1-3 clips at 48 frames, i.e. 3 steps of 2 processes per
# epoch (an even number of batches, so nothing is repeated to fill the last step).
FRAMES_CLIPS = dict(n=8, seed=2, seconds=(0.3, 1.2))
MAX_FRAMES = 48


# ---- launching -------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The end of every worker script, reached only once the worker returned (an exception exits non-zero before it):
# gloo's threads can abort the interpreter's teardown ("terminate called without an active exception", seen in CI
# after the work was done), so the process leaves without running destructors. The workers pass a barrier first,
# so that rank 0's results are written before either process tears the group down.
LEAVE = "sys.stdout.flush(); sys.stderr.flush()\nimport os\nos._exit(0)\n"


def launch(config: str, worker: str, output_dir: Path, timeout=600):
    """`accelerate launch --config_file examples/accelerate/<config>` running `<worker>(output_dir)` of this file
    in 2 CPU processes."""
    script = output_dir / "worker.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nimport test_multi_process\n"
                      f"test_multi_process.{worker}({str(output_dir)!r})\n{LEAVE}")
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO), *sys.path])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_port()), str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=output_dir)
    assert result.returncode == 0, result.stderr[-6000:]
    return torch.load(output_dir / "rank0.pt", weights_only=False)


# ---- pieces the workers and the tests share ---------------------------------------------------------------------


class FullGradientCapture(TrainerCallback):
    """Gradients as the optimizer sees them (after DDP's all-reduce or FSDP's reduce-scatter), whole: a sharded
    gradient is gathered (a collective: every process runs this callback)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                grad = param.grad.detach()
                grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
        self.grads = grads


def force_fsdp(trainer):
    """Restore the FSDP plugin that accelerate drops on a CPU (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true"  # launched with fsdp.yaml
    assert not trainer.is_fsdp_enabled and trainer.accelerator.distributed_type == DistributedType.MULTI_CPU
    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of fsdp.yaml
    if state.mixed_precision != "no":
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    # What AcceleratorState.__init__ does on a GPU: both shared states say FSDP (each AcceleratorState() call
    # copies the PartialState's values over its own).
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def frames_dataset():
    import datasets

    clips = Clips(**FRAMES_CLIPS)
    table = datasets.Dataset.from_dict({"index": list(range(len(clips))),
                                        "num_frames": [len(video) for _, video in clips.clips]})
    return clips, table


def recording_collator(trainer, clips, batches):
    """Collate dataset rows (index, num_frames) into the clips' batches, appending each batch's indices."""
    inner = trainer.data_collator

    def collate(rows):
        batches.append([row["index"] for row in rows])
        return inner([clips[row["index"]] for row in rows])

    return collate


def evaluation_results(trainer):
    """Evaluation of 5 utterances (odd: the second process's last batch is a repeat) with batch 1, where each
    utterance's CE and decorrelation do not depend on its batch, and prediction with batch 2."""
    evaluation = Clips(5, seed=1)
    trainer.args.per_device_eval_batch_size = 1
    metrics = trainer.evaluate(evaluation)
    trainer.args.per_device_eval_batch_size = 2
    prediction = trainer.predict(evaluation)
    return {"metrics": metrics, "predictions": prediction.predictions, "label_ids": prediction.label_ids,
            "predict_metrics": prediction.metrics}


def scaling_run(output_dir, fsdp=False):
    """One optimizer step at batch 2 per process, then the evaluations."""
    capture = FullGradientCapture()
    trainer = make_trainer(output_dir, Clips(4), modality="avsr", callbacks=[capture], ddp_backend="gloo")
    if fsdp:
        force_fsdp(trainer)
    trainer.train()
    # After training, before evaluation (which leaves FSDP's unsharded tail group, the tied embeddings, gathered).
    results = {"sharded": sorted(name for name, p in trainer.model.named_parameters() if hasattr(p, "full_tensor")),
               "replicated": sorted(name for name, p in trainer.model.named_parameters()
                                    if not hasattr(p, "full_tensor")),
               "model_class": type(trainer.model).__name__,
               "distributed_type": str(trainer.accelerator.distributed_type),
               "num_processes": trainer.accelerator.num_processes}
    return trainer, {"grads": capture.grads, "log": trainer.state.log_history[0], **evaluation_results(trainer),
                     **results}


# ---- workers (run by each process under accelerate launch) ------------------------------------------------------


def ddp_worker(output_dir: str):
    output_dir = Path(output_dir)
    trainer, results = scaling_run(output_dir / "scaling")
    rank = trainer.args.process_index

    # Max-frames batches over 2 epochs, saving a light checkpoint inside epoch 2, then resumed from it.
    clips, table = frames_dataset()
    settings = dict(max_frames_per_batch=MAX_FRAMES, max_steps=6, save_strategy="steps", save_steps=4,
                    learning_rate=1e-2, ddp_backend="gloo")
    uninterrupted = make_trainer(output_dir / "frames", table, modality="avsr", **settings)
    uninterrupted_batches = []
    uninterrupted.data_collator = recording_collator(uninterrupted, clips, uninterrupted_batches)
    uninterrupted.train()
    steps = StepCounter()
    resumed = make_trainer(output_dir / "resumed", table, modality="avsr", callbacks=[steps], **settings)
    resumed_batches = []
    resumed.data_collator = recording_collator(resumed, clips, resumed_batches)
    resumed.train(resume_from_checkpoint=str(output_dir / "frames" / "checkpoint-4"))

    (output_dir / f"batches_rank{rank}.json").write_text(json.dumps(
        {"uninterrupted": uninterrupted_batches, "resumed": resumed_batches}))
    if rank == 0:
        results.update(uninterrupted_logs=uninterrupted.state.log_history, resumed_logs=resumed.state.log_history,
                       resumed_steps=steps.count)
        torch.save(results, output_dir / "rank0.pt")
    torch.distributed.barrier()  # rank 0's file is written before either process tears the group down
    trainer.accelerator.end_training()


def fsdp_worker(output_dir: str):
    trainer, results = scaling_run(Path(output_dir) / "scaling", fsdp=True)
    if trainer.args.process_index == 0:
        torch.save(results, Path(output_dir) / "rank0.pt")
    torch.distributed.barrier()
    trainer.accelerator.end_training()


# ---- the tests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process references: one step at batch 4, then the same evaluations."""
    capture = FullGradientCapture()
    trainer = make_trainer(tmp_path_factory.mktemp("single"), Clips(4), modality="avsr", callbacks=[capture],
                           per_device_train_batch_size=4)
    trainer.train()
    return {"grads": capture.grads, "log": trainer.state.log_history[0], **evaluation_results(trainer)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    return output_dir, launch("ddp.yaml", "ddp_worker", output_dir)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fsdp")
    return output_dir, launch("fsdp.yaml", "fsdp_worker", output_dir)


def test_configs_parse_for_the_gpus():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
    from tiny import tiny_config

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes == 2 and not ddp.use_cpu
    assert ddp.mixed_precision == "bf16"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP and fsdp.mixed_precision == "bf16"
    options = fsdp.fsdp_config
    assert options["fsdp_version"] == 2 and options["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"

    # The wrapped class exists in the model, and the ignored modules are exactly the (frozen) encoders.
    import re

    from accelerate.utils.dataclasses import get_module_class_from_name

    model = LlamaAVSRForConditionalGeneration(tiny_config("avsr"))
    assert get_module_class_from_name(model, options["fsdp_transformer_layer_cls_to_wrap"]) is not None
    ignored = [name for name, _ in model.named_modules() if re.fullmatch(options["fsdp_ignored_modules"], name)]
    assert ignored == ["model.audio_encoder", "model.video_encoder"]


def assert_same_gradients(got, expected, rel=1e-5):
    assert set(got) == set(expected) and len(expected) > 0
    flat_got = torch.cat([got[n].flatten() for n in sorted(got)])
    flat_expected = torch.cat([expected[n].flatten() for n in sorted(expected)])
    assert flat_expected.norm() > 0
    relative = float((flat_got - flat_expected).norm() / flat_expected.norm())
    assert relative < rel, relative


def assert_same_training_and_evaluation(run, single):
    assert run["num_processes"] == 2
    assert_same_gradients(run["grads"], single["grads"])
    for key in ("loss", "ce_loss", "decor_loss", "grad_norm"):
        assert run["log"][key] == pytest.approx(single["log"][key], rel=1e-5), key
    # Every utterance counted once: the CE, decorrelation and WER of 2 processes equal one process's.
    for key in ("eval_loss", "eval_ce_loss", "eval_decor_loss", "eval_wer"):
        assert run["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5), key
    # Batch 2: the second process's last batch is 2 repeated rows, the first's one real row and a repeat.
    for key in ("test_loss", "test_ce_loss", "test_decor_loss", "test_wer"):
        assert run["predict_metrics"][key] == pytest.approx(single["predict_metrics"][key], rel=1e-5), key
    # The predicted rows: 5, one per utterance, each with its own prediction (the order is the processes' order).
    assert run["label_ids"].shape[0] == 5

    def rows(result):
        return sorted((tuple(label[label != -100]), tuple(prediction[prediction != -100]))
                      for label, prediction in zip(result["label_ids"], result["predictions"]))

    assert rows(run) == rows(single)


def test_ddp_config_two_processes_equal_one(ddp_run, one_process):
    _, run = ddp_run
    assert run["distributed_type"] == "DistributedType.MULTI_CPU"  # ddp.yaml's MULTI_GPU, on a CPU
    assert_same_training_and_evaluation(run, one_process)


def test_ddp_evaluation_counts_each_utterance_once(ddp_run, one_process):
    from tiny import tiny_tokenizer

    _, run = ddp_run
    tokenizer = tiny_tokenizer()
    references = sorted(tokenizer.decode(label[label != -100], skip_special_tokens=True).strip()
                        for label in run["label_ids"])
    assert references == sorted(TARGETS[i % len(TARGETS)] for i in range(5))


def test_max_frames_batches_dealt_without_overlap(ddp_run):
    output_dir, _ = ddp_run
    batches = [json.loads((output_dir / f"batches_rank{rank}.json").read_text())["uninterrupted"] for rank in (0, 1)]
    clips = Clips(**FRAMES_CLIPS)
    frames = [len(video) for _, video in clips.clips]
    assert [len(b) for b in batches] == [6, 6]  # 3 steps per epoch, 2 epochs, every process every step
    for epoch in range(2):
        dealt = [i for rank in (0, 1) for batch in batches[rank][3 * epoch : 3 * epoch + 3] for i in batch]
        assert sorted(dealt) == list(range(len(frames))), (epoch, batches)  # each clip once per epoch
    for rank in (0, 1):
        for batch in batches[rank]:  # within the budget (lengths rounded up to 5), or a clip on its own
            assert len(batch) == 1 or len(batch) * -(-max(frames[i] for i in batch) // 5) * 5 <= MAX_FRAMES
    assert batches[0][:3] != batches[0][3:]  # another order in the second epoch


def test_light_checkpoint_from_one_process_resumes_two(ddp_run):
    output_dir, run = ddp_run
    checkpoint = output_dir / "frames" / "checkpoint-4"
    saved = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= saved
    assert "model.safetensors" not in saved
    assert run["resumed_steps"] == 2  # steps 5 and 6, the last two of the second epoch

    def losses(logs):
        return {log["step"]: (log["loss"], log["ce_loss"], log["decor_loss"]) for log in logs if "loss" in log}

    uninterrupted, resumed = losses(run["uninterrupted_logs"]), losses(run["resumed_logs"])
    for step in (5, 6):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    for rank in (0, 1):  # the resumed processes got the batches the uninterrupted ones got at steps 5 and 6
        batches = json.loads((output_dir / f"batches_rank{rank}.json").read_text())
        assert batches["resumed"] == batches["uninterrupted"][4:], rank


def test_fsdp_config_two_processes_equal_one(fsdp_run, one_process):
    _, run = fsdp_run
    assert run["distributed_type"] == "DistributedType.FSDP" and run["model_class"].startswith("FSDP")
    assert_same_training_and_evaluation(run, one_process)
    # The plan of fsdp.yaml: the LLM (decoder layers with their LoRA, embeddings, norm) and the projectors sharded;
    # the encoders left to each process whole.
    assert "model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight" in run["sharded"]
    assert "model.language_model.embed_tokens.weight" in run["sharded"]
    assert "model.video_projector.linear_1.weight" in run["sharded"]
    assert run["replicated"] and all(name.startswith(("model.audio_encoder.", "model.video_encoder."))
                                     for name in run["replicated"])


def test_fsdp_refuses_an_ignored_module_that_trains():
    from trainer.avsr_trainer import check_fsdp_ignored_modules

    from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
    from tiny import tiny_config

    pattern = r"model\.(audio|video)_encoder"
    check_fsdp_ignored_modules(LlamaAVSRForConditionalGeneration(tiny_config("avsr")), pattern)  # frozen: fine
    trained = LlamaAVSRForConditionalGeneration(tiny_config("avsr", freeze_video_encoder=False))
    with pytest.raises(ValueError, match=r"model\.video_encoder .*trainable"):
        check_fsdp_ignored_modules(trained, pattern)


def test_bench_gpu_multi_gpu_quick(tmp_path):
    # The scaling benchmark's every code path on the CPU: one process at b and 2b, ddp.yaml and fsdp.yaml launches
    # with 2 gloo processes (FSDP is plain data parallel there, as accelerate has it). NVLink multicast is forced off
    # in every process it starts, whatever the caller's environment says.
    out = tmp_path / "bench.json"
    env = {**os.environ, "NCCL_NVLS_ENABLE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run([sys.executable, str(REPO / "examples" / "benchmarks" / "bench_gpu.py"), "--multi-gpu",
                             "--quick", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(out.read_text())
    runs, summary = report["runs"], report["summary"]
    assert set(runs) == {"one_b", "one_2b", "ddp", "fsdp"}
    assert [runs[name]["processes"] for name in ("one_b", "one_2b", "ddp", "fsdp")] == [1, 1, 2, 2]
    assert runs["one_2b"]["global_batch"] == runs["ddp"]["global_batch"] == runs["fsdp"]["global_batch"] == 4
    assert runs["fsdp"]["distributed_type"] == "MULTI_CPU" and not runs["fsdp"]["sharded"]
    assert all(run["nccl_nvls_enable"] == "0" for run in runs.values())
    assert len({run["weights_fingerprint"] for run in runs.values()}) == 1  # one starting model everywhere
    for name in ("ddp", "fsdp"):  # fp32: 2 processes x 2 follow one process x 4 step for step
        assert len(runs[name]["loss"]) == 10 and summary[f"{name}_loss_vs_one_gpu_2b_max_rel_diff"] < 1e-4
    assert runs["one_2b"]["loss"][-1] < runs["one_2b"]["loss"][0]  # it trains
    assert all(run["samples_per_s"] > 0 and run["timed_steps"] > 0 for run in runs.values())
    assert summary["ddp_speedup_vs_one_gpu_same_per_gpu_batch"] > 0
    assert "| ddp | 2 | MULTI_CPU | 2 |" in result.stdout  # the table for RESULTS.md


@pytest.mark.slow
def test_readme_command_on_two_cpu_processes(tmp_path, offline_cache_dir):
    # README's `accelerate launch --config_file examples/accelerate/ddp.yaml examples/run_avsr.py ...` on the real
    # SmolLM2-135M + Whisper tiny.en, 2 CPU processes, a test split of 5 (odd) utterances; then the final model
    # evaluated on one process gives the run's test WER, CE and decorrelation. Evaluation batch 1: with the trimmed
    # log-mel window a clip's features depend a little on the longest clip of its batch, and the last batch of 2
    # processes holds other clips than one process's. The launched script is run_avsr.main() followed by LEAVE:
    # run_avsr.py has left the process group (end_training) when main() returns; a failure in main() still exits
    # non-zero, and the files the run wrote are checked below.
    from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
    from modeling_llama_avsr.data import load_synthetic, make_corpus
    from modeling_llama_avsr.data.collator import AVSRDataCollator
    from trainer import AVSRTrainer, AVSRTrainingArguments

    corpus, out = tmp_path / "corpus", tmp_path / "run"
    script = tmp_path / "run_avsr_then_leave.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO / 'examples')!r})\nimport run_avsr\n"
                      f"run_avsr.main()\n{LEAVE}")
    sizes = ["--num_train", "8", "--num_validation", "4", "--num_test", "5"]
    make_corpus(str(corpus), num_train=8, num_validation=4, num_test=5, num_workers=1)  # once, before the processes
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(free_port()), str(script),
               "--data_dir", str(corpus), *sizes, "--output_dir", str(out), "--max_steps", "4",
               "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "1", "--save_strategy", "steps",
               "--save_steps", "2", "--logging_steps", "1", "--generation_max_new_tokens", "8",
               "--ddp_find_unused_parameters", "false"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_utterances"] == 5
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in (out / "checkpoint-4").iterdir()}

    processor = LlamaAVSRProcessor.from_pretrained(out / "final")
    trainer = AVSRTrainer(
        model=LlamaAVSRForConditionalGeneration.from_pretrained(out / "final"), processing_class=processor,
        args=AVSRTrainingArguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=1,
                                   generation_max_new_tokens=8, report_to="none", use_cpu=True, disable_tqdm=True),
        data_collator=AVSRDataCollator(processor, babble_pool=[]),
    )
    alone = trainer.evaluate(load_synthetic(str(corpus), "test"), metric_key_prefix="test")
    assert alone["test_wer"] == pytest.approx(summary["test"]["clean"]["wer"], abs=1e-9)
    for key in ("ce_loss", "decor_loss"):
        assert alone[f"test_{key}"] == pytest.approx(summary["test"]["clean"][key], rel=1e-4), key
