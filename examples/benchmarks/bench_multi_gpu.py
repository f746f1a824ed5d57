"""Several GPUs through accelerate: DDP and FSDP against one GPU, training AVSRTrainer at the paper's shapes.

Random weights of the paper's shapes, nothing from the Hub: Llama 3.2-3B (hidden 3072, 28 layers, 24 heads, 8 KV
heads, FFN 8192, vocabulary 128256, tied embeddings), the Whisper-medium encoder, AV-HuBERT Large; AVSR with (16, 5)
average pooling, 6-s clips (87 LLM tokens), LoRA on q/v with rank 96, projectors with LayerNorm, the paper's
decorrelation loss (lambda 1e4, the original's layers and prefix tokens); fp32 weights and bf16 mixed precision, as
`accelerate launch --config_file examples/accelerate/ddp.yaml examples/run_avsr.py ...` trains.

    python examples/benchmarks/bench_multi_gpu.py --out outputs/bench_multi_gpu.json     # 2 GPUs, a few minutes
    python examples/benchmarks/bench_multi_gpu.py --quick --out /tmp/bench_multi_gpu.json  # CPU, tiny, 2 gloo procs

Runs, each in processes of its own, started with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, forced whatever the caller's environment says):
  one   `python bench_multi_gpu.py --worker one` on the first GPU: per-GPU batch b, then 2b
  ddp   `accelerate launch --config_file examples/accelerate/ddp.yaml bench_multi_gpu.py --worker ddp`, b per GPU
  fsdp  the same with examples/accelerate/fsdp.yaml (decoder layers sharded, encoders replicated), b per GPU
Every run trains the same clips in the same order (sequential sampling: step k of 2 processes x b holds the clips
of step k of 1 process x 2b) from the same seeded weights, for `--steps` steps after a first epoch that fills the
batch cache (batches are collated once and then reused, so the host's feature extraction is not timed).
Reported: samples/s over the cached steps, DDP / one GPU at the same per-GPU batch (the issue asks >= 1.8), FSDP's
memory per GPU (the wrapped model's, and the peak while training) and samples/s against DDP, and the loss curves of DDP and FSDP against one GPU at 2b over the
first `--steps` steps (largest relative difference; bf16 noise is about 1e-2, fp32 on the CPU about 1e-6).

--quick runs the same code on the CPU: tiny shapes, fp32, gloo. accelerate runs FSDP on accelerator devices only, so
there the fsdp run is plain data parallel (its `distributed_type` says MULTI_CPU); tests/test_multi_process.py checks
FSDP's sharding on the CPU.
"""

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository, when the package is not installed

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (LlamaConfig, PreTrainedTokenizerFast, TrainerCallback, WhisperConfig,  # noqa: E402
                          WhisperFeatureExtractor)

from modeling_llama_avsr import (AVHubertConfig, LlamaAVSRConfig, LlamaAVSRForConditionalGeneration,  # noqa: E402
                                 LlamaAVSRProcessor)
from modeling_llama_avsr.tokenization_llama_avsr import prepare_tokenizer  # noqa: E402
from trainer import AVSRTrainer, AVSRTrainingArguments  # noqa: E402

logger = logging.getLogger("bench_multi_gpu")

CONFIGS = REPO / "examples" / "accelerate"
# NVLink multicast can take a shared host's GPUs out of service: off in every process this script starts.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PROMPT = "transcribe speech and video to text ."
FILLER = [f"w{i}" for i in range(200)]

SHAPES = {
    "paper": dict(
        text=dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256, head_dim=128, rope_theta=500000.0,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
        audio=dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                   decoder_layers=1, decoder_attention_heads=16, decoder_ffn_dim=4096, num_mel_bins=80),
        video=dict(),  # AVHubertConfig's defaults are AV-HuBERT Large
        lora_rank=96, lora_alpha=12, projector_hidden_size=2048, seconds=6.0, tokens=87, batch=8, steps=20,
    ),
    "quick": dict(
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                   decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80),
        video=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_pos=8,
                   conv_pos_groups=2, resnet_frontend_channels=4, resnet_channels=[4, 4, 8, 8]),
        lora_rank=4, lora_alpha=8, projector_hidden_size=32, seconds=1.0, tokens=40, batch=2, steps=6,
    ),
}
EPOCH_STEPS = 4  # steps of the first epoch at the global batch 2b: they fill the batch cache and are not timed
SEED = 0


# ---- model and data ------------------------------------------------------------------------------------------------


def word_tokenizer():
    words = ["<unk>", "<s>", "</s>", "<pad>", *PROMPT.split(), *FILLER]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build(shape, device):
    """The model (fp32, seeded: every process and every run starts from the same weights) and its processor."""
    tokenizer = word_tokenizer()
    token_ids = prepare_tokenizer(tokenizer)
    text = LlamaConfig(**shape["text"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlamaAVSRConfig(
        text_config=text, audio_config=WhisperConfig(**shape["audio"]), video_config=AVHubertConfig(**shape["video"]),
        modality="avsr", compression_type="avg", audio_compression_rate=16, video_compression_rate=5,
        projector_hidden_size=shape["projector_hidden_size"], projector_layer_norm=True,
        lora_rank=shape["lora_rank"], lora_alpha=shape["lora_alpha"], prompt=PROMPT, **token_ids,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaAVSRForConditionalGeneration(config)
    processor = LlamaAVSRProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer,
                                   modality="avsr", prompt=PROMPT, audio_compression_rate=16,
                                   video_compression_rate=5, audio_window="trimmed")
    return model, processor


def fingerprint(model) -> float:
    """A sum over every weight: equal in two runs (or processes) only if they start from the same model."""
    with torch.no_grad():
        return float(sum(p.detach().sum(dtype=torch.float64) for p in model.parameters()))


class Clips(torch.utils.data.Dataset):
    """n random clips of the shape's length, with transcripts that make every sequence `tokens` long; items are
    indices, which CachedCollator turns into batches."""

    def __init__(self, n, shape, processor):
        rng = np.random.default_rng(SEED)
        seconds = shape["seconds"]
        self.audio = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(n)]
        self.video = [rng.integers(0, 256, size=(int(seconds * 25), 96, 96), dtype=np.uint8) for _ in range(n)]
        prefix = processor(audio=self.audio[:1], videos=self.video[:1])["input_ids"].shape[1]
        words = max(1, shape["tokens"] - prefix - 1)  # and EOS
        self.text = [" ".join(rng.choice(FILLER, words)) for _ in range(n)]

    def __len__(self):
        return len(self.text)

    def __getitem__(self, i):
        return i


class CachedCollator:
    """The processor's batch for a set of clips, made once: from the second epoch on, steps are the GPUs' alone."""

    def __init__(self, clips, processor):
        self.clips, self.processor, self.cache = clips, processor, {}

    def __call__(self, indices):
        key = tuple(indices)
        if key not in self.cache:
            self.cache[key] = dict(self.processor(audio=[self.clips.audio[i] for i in key],
                                                  videos=[self.clips.video[i] for i in key],
                                                  text=[self.clips.text[i] for i in key]))
        return self.cache[key]


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (after the device has finished it), and the memory the model
    holds once wrapped: Trainer prepares (DDP, FSDP) the model before on_train_begin, so the peak counted from here
    on is training's, not that of the whole model each process built before FSDP sharded it."""

    def __init__(self):
        self.ends = []
        self.resident_gib = None

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.resident_gib = torch.cuda.memory_allocated() / 2**30

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


# ---- one training run (in the worker processes) --------------------------------------------------------------------


def train(shape, batch, steps, output_dir, quick, clips, processor, model):
    """`steps` optimizer steps at `batch` per process; returns losses, samples/s over the cached steps, peak memory."""
    args = AVSRTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        lr_scheduler_type="constant", adam_beta2=0.98, weight_decay=0.1, max_grad_norm=10.0,
        decorrelation_weight=1e4, decorrelation_layers="reference", decorrelation_tokens="prefix",
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=SEED, bf16=not quick, use_cpu=quick,
        ddp_find_unused_parameters=False,  # every trained tensor is used in every step (NCCL on GPUs, gloo on a CPU)
    )
    clock = StepClock()
    trainer = AVSRTrainer(model=model, args=args, train_dataset=clips, data_collator=CachedCollator(clips, processor),
                          processing_class=processor, callbacks=[clock])
    trainer.train()
    world = trainer.accelerator.num_processes
    global_batch = batch * world
    first = len(clips) // global_batch  # the steps of the first epoch (uncached batches, warm-up)
    timed = len(clock.ends) - first
    seconds = clock.ends[-1] - clock.ends[first - 1]
    peaks = resident = None  # a CPU has no allocator statistics
    if torch.cuda.is_available():
        memory = torch.tensor([[torch.cuda.max_memory_allocated() / 2**30, clock.resident_gib]],
                              device=trainer.args.device)
        peaks, resident = trainer.accelerator.gather(memory).T.tolist()
    logs = [log for log in trainer.state.log_history if "loss" in log and "step" in log]
    result = {
        "processes": world, "per_device_batch": batch, "global_batch": global_batch,
        "distributed_type": str(trainer.accelerator.distributed_type).removeprefix("DistributedType."),
        "sharded": trainer.is_fsdp_enabled, "mixed_precision": trainer.accelerator.mixed_precision,
        "timed_steps": timed, "samples_per_s": global_batch * timed / seconds, "step_ms": 1000 * seconds / timed,
        "peak_gib_per_device": peaks, "model_gib_per_device": resident,
        "loss": [log["loss"] for log in logs], "ce_loss": [log["ce_loss"] for log in logs],
        "decor_loss": [log["decor_loss"] for log in logs],
    }
    trainer.accelerator.wait_for_everyone()
    return trainer, result


def worker(args):
    shape = SHAPES["quick" if args.quick else "paper"]
    batch = args.batch or shape["batch"]
    steps = args.steps or shape["steps"]
    logging.basicConfig(level=logging.WARNING)
    from accelerate import PartialState

    state = PartialState(cpu=args.quick)
    device = "cpu" if args.quick else f"cuda:{state.local_process_index}"
    runs = {}
    # One clip set for every run: 4 steps of the global batch 2b per epoch, at most steps + 4 steps in all.
    batches = [("one_b", batch), ("one_2b", 2 * batch)] if args.worker == "one" else [(args.worker, batch)]
    for name, per_device in batches:
        model, processor = build(shape, device)
        start_print = fingerprint(model)
        if state.num_processes > 1:  # FSDP shards each process's own copy: they must be equal
            prints = [None] * state.num_processes
            torch.distributed.all_gather_object(prints, start_print)
            if len(set(prints)) != 1:
                raise RuntimeError(f"the processes built different weights: {prints}")
        clips = Clips(EPOCH_STEPS * 2 * batch, shape, processor)
        with tempfile.TemporaryDirectory() as output_dir:
            trainer, result = train(shape, per_device, steps + EPOCH_STEPS, output_dir, args.quick, clips,
                                    processor, model)
        result["weights_fingerprint"] = start_print
        result["nccl_nvls_enable"] = os.environ.get("NCCL_NVLS_ENABLE")
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        runs[name] = result
        trainer.accelerator.free_memory()
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if state.is_main_process:
        Path(args.result).write_text(json.dumps(runs, indent=1))
    state.destroy_process_group()  # leave the group before exit: a live one can abort the interpreter


# ---- the driver: starts the runs, compares them ------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(name, args, result):
    script = [str(Path(__file__).resolve()), "--worker", name, "--result", str(result)]
    for flag in ("batch", "steps"):
        if getattr(args, flag):
            script += [f"--{flag}", str(getattr(args, flag))]
    if args.quick:
        script.append("--quick")
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if name == "one":
        # Trainer would spread a plain process over every visible GPU with DataParallel: show it one.
        if not args.quick:
            env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{name}.yaml"),
                   "--num_processes", str(args.gpus), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(free_port())]
        if args.quick:  # the YAMLs are for GPUs: bf16 autocast and NCCL there, fp32 and gloo here
            command += ["--mixed_precision", "no"]
            env["OMP_NUM_THREADS"] = "1"
        command += script
    logger.info("%s: %s", name, " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    runs = json.loads(Path(result).read_text())
    for run in runs.values():
        run["wall_s"] = round(time.perf_counter() - start, 1)
        run["command"] = " ".join(command)
    return runs


def largest_relative_difference(curve, reference):
    steps = min(len(curve), len(reference))
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(curve[:steps], reference[:steps]))


def compare(runs, steps):
    """The numbers the issue asks for, from the runs present."""
    summary = {}
    one_b, one_2b, ddp, fsdp = (runs.get(k) for k in ("one_b", "one_2b", "ddp", "fsdp"))
    if one_b and ddp:
        summary["ddp_speedup_vs_one_gpu_same_per_gpu_batch"] = ddp["samples_per_s"] / one_b["samples_per_s"]
    if ddp and fsdp:
        summary["fsdp_samples_per_s_vs_ddp"] = fsdp["samples_per_s"] / ddp["samples_per_s"]
        if fsdp["peak_gib_per_device"] and ddp["peak_gib_per_device"]:
            summary["fsdp_peak_gib_vs_ddp"] = [max(fsdp["peak_gib_per_device"]), max(ddp["peak_gib_per_device"])]
    for name, run in (("ddp", ddp), ("fsdp", fsdp)):
        if run and one_2b:
            same_start = run["weights_fingerprint"] == one_2b["weights_fingerprint"]
            summary[f"{name}_loss_vs_one_gpu_2b_max_rel_diff"] = largest_relative_difference(
                run["loss"][:steps], one_2b["loss"][:steps]) if same_start else None
    return summary


def environment(args):
    import accelerate
    import peft
    import transformers

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "peft": peft.__version__, "command": " ".join(sys.argv),
            **{name: NO_MULTICAST[name] for name in NO_MULTICAST}}
    info["visible_gpus"] = torch.cuda.device_count()  # names come from the workers: no CUDA context here
    return info


def table(report):
    runs, summary = report["runs"], report["summary"]
    lines = ["| run | processes | distributed | per-GPU batch | samples/s | step ms | model GiB per GPU | "
             "peak GiB per GPU |", "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        peaks, model = (", ".join(f"{p:.1f}" for p in run[key] or []) or "-"
                        for key in ("peak_gib_per_device", "model_gib_per_device"))
        lines.append(f"| {name} | {run['processes']} | {run['distributed_type']} | {run['per_device_batch']} | "
                     f"{run['samples_per_s']:.1f} | {run['step_ms']:.0f} | {model} | {peaks} |")
    lines += ["", *(f"- {key}: {value}" for key, value in summary.items())]
    return "\n".join(lines)


def driver(args):
    shape = SHAPES["quick" if args.quick else "paper"]
    if not args.quick and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"{args.gpus} GPUs needed, {torch.cuda.device_count()} visible (--quick runs on the CPU)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(args), "shapes": "quick" if args.quick else "paper", "runs": {},
              "summary": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.runs.split(","):
            report["runs"].update(run_worker(name, args, Path(scratch) / f"{name}.json"))
            report["summary"] = compare(report["runs"], args.steps or shape["steps"])
            out.write_text(json.dumps(report, indent=1))  # after every run: a later failure keeps the earlier ones
    print(table(report))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="outputs/bench_multi_gpu.json", help="JSON report (the driver)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, fp32, gloo")
    parser.add_argument("--runs", default="one,ddp,fsdp", help="which runs, in this order")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the ddp and fsdp runs")
    parser.add_argument("--batch", type=int, default=None, help="per-GPU batch b (paper: 8, quick: 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="loss-curve steps (paper: 20, quick: 6); every run trains 4 more")
    parser.add_argument("--worker", choices=["one", "ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(NO_MULTICAST)
    if args.worker:
        return worker(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return driver(args)


if __name__ == "__main__":
    main()
