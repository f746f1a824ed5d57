"""Training and transcription speed at the paper's scale on one GPU, every comparison measured in one run.

Random weights of the paper's shapes (nothing from the Hub): Llama 3.2-3B (hidden 3072, 28 layers, 24 heads, 8 KV
heads, FFN 8192, vocabulary 128256), the Whisper-medium encoder, AV-HuBERT Large (ResNet-18 front-end), AVSR with
(16, 5) average pooling, 6-s clips (87 LLM tokens), LoRA on q/v with rank 96, bf16 weights, fused AdamW.

Training modes (samples/s and peak memory of the steady-state step; the batch already on the device):
  original   the original code's choices: 30-s Whisper window, eager attention, logits over the whole sequence and
             vocabulary, its per-layer decorrelation loss; batch 8
  package    trimmed window, sdpa, logits at the labels only, the fused decorrelation loss (and without it, and with
             the per-layer one); batch 8
  fast       package + compiled layers (CUDA graphs), token length padded to a multiple of 32, uint8 video;
             batch 8 (with / without decorrelation, with cached encoder outputs), 32 and 64
MFU counts every FLOP of a step (encoders forward, LLM forward and backward; FlopCounterMode on an eager step)
against a bf16 matmul measured in the same run. Transcription: batch-1 beam-15 (the original's setting), batched
beam-15 (and the same with the media encoded and the prompt run on every beam, as GenerationMixin
does), batched greedy; 24 new tokens.

    python examples/benchmarks/bench_gpu.py --out bench_gpu.json             # about 6 minutes on an H200
    python examples/benchmarks/bench_gpu.py --quick --device cpu --out q.json  # every code path, tiny, < 1 min

A mode that fails is reported (error and traceback tail) and the run goes on; the JSON is rewritten after every
mode, and modes that would not fit the time budget (--budget seconds) are skipped, in priority order.
Optional: --embedded-default CORPUS --text-model DIR --audio-encoder DIR times run_avsr.py's default recipe.

Several GPUs (--multi-gpu): DDP and FSDP through accelerate against one GPU, training AVSRTrainer on the model above
(bf16 frozen weights as run_avsr.py loads them on a GPU, the trained tensors in fp32 in every run, as accelerate's
FSDP makes them anyway; bf16 mixed precision from the YAMLs; the decorrelation loss with the paper's lambda 1e4, the
original's layers and prefix tokens):

    python examples/benchmarks/bench_gpu.py --multi-gpu --out bench_multi_gpu.json          # 2 GPUs, a few minutes
    python examples/benchmarks/bench_gpu.py --multi-gpu --quick --out q.json                # CPU, 2 gloo processes

Runs, each in processes of its own, started with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, forced whatever the caller's environment says):
  one   `python bench_gpu.py --multi-gpu-worker one` on the first GPU: per-GPU batch b (8), then 2b
  ddp   `accelerate launch --config_file examples/accelerate/ddp.yaml bench_gpu.py --multi-gpu-worker ddp`, b per GPU
  fsdp  the same with examples/accelerate/fsdp.yaml (decoder layers sharded, encoders replicated), b per GPU
Every run trains the same clips in the same order (sequential sampling: step k of 2 processes x b holds the clips of
step k of 1 process x 2b) from the same seeded weights, for 20 steps (--steps) after a first epoch of 4 steps that
fills a batch cache (batches are collated once, then reused: the host's feature extraction is not timed).
Reported: samples/s over the cached steps; DDP / one GPU at the same per-GPU batch (the issue asks >= 1.8); FSDP's
memory per GPU (the wrapped model's, and the peak while training) and samples/s against DDP; the loss curves of DDP
and FSDP against one GPU at 2b over the first 20 steps (largest relative difference: bf16 noise on a GPU, about 1e-6
in fp32 on a CPU). On a CPU accelerate runs FSDP as plain data parallelism (its distributed_type says MULTI_CPU);
tests/test_multi_process.py checks the sharding there.
"""

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GenerationMixin, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback, WhisperConfig,
                          WhisperFeatureExtractor)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when the package is not installed

from modeling_llama_avsr import AVHubertConfig, LlamaAVSRConfig, LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from modeling_llama_avsr.tokenization_llama_avsr import prepare_tokenizer
from trainer import AVSRTrainer, AVSRTrainingArguments, decorrelation_loss
from trainer.avsr_trainer import LogitsToKeepCollator, apply_liger_kernel_to_text_model
from trainer.decorrelation import layer_indices

logger = logging.getLogger("bench_gpu")

PROMPT = "transcribe speech and video to text ."
FILLER = [f"w{i}" for i in range(200)]

SHAPES = {
    "paper": dict(
        text=dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                  intermediate_size=8192, vocab_size=128256, head_dim=128, rope_theta=500000.0,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
        audio=dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096, decoder_layers=1,
                   decoder_attention_heads=16, decoder_ffn_dim=4096, num_mel_bins=80),
        video=dict(),  # AVHubertConfig's defaults are AV-HuBERT Large
        lora_rank=96, projector_hidden_size=2048, seconds=6.0, tokens=87, batches=(8, 32, 64),
        beam_single=8, beam_batch=32, beam_batch_large=64, greedy_batch=64, new_tokens=24, beams=15, peak_size=8192,
        measure_s=3.0, warmup=2, compile_kwargs=None,  # None: inductor with --compile-mode
    ),
    "quick": dict(
        text=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                   decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80),
        video=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_pos=8,
                   conv_pos_groups=2, resnet_frontend_channels=4, resnet_channels=[4, 4, 8, 8]),
        lora_rank=4, projector_hidden_size=32, seconds=1.0, tokens=40, batches=(2, 4),
        beam_single=2, beam_batch=4, beam_batch_large=6, greedy_batch=4, new_tokens=4, beams=3, peak_size=256,
        # Code paths, not speed: one timed call, and dynamo without a code generator (inductor's C++ builds take
        # minutes on a small CPU; tests/test_speed.py checks inductor on the CPU).
        measure_s=0.0, warmup=1, compile_kwargs={"backend": "eager"},
    ),
}
DECORRELATION_WEIGHT = 10.0
PAD_TO = 32


# ---- the model and its batches -----------------------------------------------------------------------------------


def word_tokenizer():
    words = ["<unk>", "<s>", "</s>", "<pad>", *PROMPT.split(), *FILLER]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build(shapes, device, dtype):
    tokenizer = word_tokenizer()
    token_ids = prepare_tokenizer(tokenizer)
    text = LlamaConfig(**shapes["text"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlamaAVSRConfig(
        text_config=text, audio_config=WhisperConfig(**shapes["audio"]), video_config=AVHubertConfig(**shapes["video"]),
        modality="avsr", compression_type="avg", audio_compression_rate=16, video_compression_rate=5,
        projector_hidden_size=shapes["projector_hidden_size"], lora_rank=shapes["lora_rank"],
        lora_alpha=2 * shapes["lora_rank"], prompt=PROMPT, **token_ids,
    )
    with torch.device(device):
        model = LlamaAVSRForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processors = {
        window: LlamaAVSRProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer,
                                   modality="avsr", prompt=PROMPT, audio_compression_rate=16,
                                   video_compression_rate=5, audio_window=window)
        for window in ("full", "trimmed")
    }
    return model, processors


def clips(n, seconds, seed=0):
    rng = np.random.default_rng(seed)
    audio = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(n)]
    video = [rng.integers(0, 256, size=(int(seconds * 25), 96, 96), dtype=np.uint8) for _ in range(n)]
    return audio, video


def transcripts(processor, audio, video, tokens):
    """Transcripts that make every sequence `tokens` long (BOS, markers, media, prompt, words, EOS)."""
    prefix = processor(audio=audio[:1], videos=video[:1])["input_ids"].shape[1]
    words = max(1, tokens - prefix - 1)
    rng = np.random.default_rng(len(audio))
    return [" ".join(rng.choice(FILLER, words)) for _ in audio]


def make_batch(processor, n, shapes, device, *, labels=True, pad_to=None, video_output="normalized", seed=0):
    audio, video = clips(n, shapes["seconds"], seed)
    processor.video_output = video_output
    try:
        text = transcripts(processor, audio, video, shapes["tokens"]) if labels else None

        def collate(_rows):
            return dict(processor(audio=audio, videos=video, text=text))

        batch = (LogitsToKeepCollator(collate, pad_to, processor.tokenizer.pad_token_id) if labels else collate)(
            [None] * n)
    finally:
        processor.video_output = "normalized"
    return to_device(batch, device)


def to_device(batch, device):
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# ---- timing --------------------------------------------------------------------------------------------------------


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def measure(fn, device, warmup, seconds, min_iters=3, max_iters=50, warm=None):
    """(warm-up seconds, mean seconds per call after it, peak GiB of the timed calls). `warm` (default `fn`) is what
    the warm-up calls; the timed calls go on until about `seconds` have passed."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        (warm or fn)()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    reset_peak(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    more = int(min(max_iters, max(min_iters, seconds / max(first, 1e-6)))) - 1
    start = time.perf_counter()
    for _ in range(more):
        fn()
    synchronize(device)
    return warmup_s, (first + time.perf_counter() - start) / (1 + max(more, 0)), peak_gib(device)


def per_layer_decorrelation(hidden_states, attention_mask, layers="paper"):
    """The original code's loss, as this package computed it before: a float32 copy and F.normalize per layer."""
    indices = layer_indices(len(hidden_states), layers)
    attended = attention_mask.bool()
    bos = attended.to(torch.uint8).argmax(-1)
    eligible = attended & (torch.arange(attended.shape[-1], device=bos.device) != bos.unsqueeze(-1))
    squared = 0.0
    for index in indices:
        unit = torch.nn.functional.normalize(hidden_states[index].float(), dim=-1, eps=1e-6)
        unit_bos = unit.gather(1, bos.view(-1, 1, 1).expand(-1, 1, unit.shape[-1]))
        squared = squared + (unit * unit_bos).sum(-1).square()
    weights = eligible.float()
    counts = weights.sum(-1)
    per_sample = (squared * weights).sum(-1) / (counts * len(indices)).clamp(min=1)
    has_tokens = (counts > 0).float()
    return (per_sample * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def trainable_gradients(model, batch, decorrelation_weight, graphs=False):
    """(loss, every trained tensor's gradient flattened into one float64 vector) of one batch, with the fused
    decorrelation loss when `decorrelation_weight` > 0; for comparing one forward and backward with another."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    trained = [p for p in model.parameters() if p.requires_grad]
    out = model(**batch, output_hidden_states=decorrelation_weight > 0)
    loss = out.loss
    if decorrelation_weight > 0:
        loss = loss + decorrelation_weight * decorrelation_loss(out.hidden_states, batch["attention_mask"])
    grads = torch.autograd.grad(loss, trained, allow_unused=True)
    return float(loss.detach()), torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()
                                            for g, p in zip(grads, trained)])


def train_step(model, optimizer, batch, decorrelation, graphs):
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = model(**batch, output_hidden_states=decorrelation is not None)
        loss = out.loss
        if decorrelation is not None:
            loss = loss + DECORRELATION_WEIGHT * decorrelation(out.hidden_states, batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ---- the run -------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.shapes = SHAPES["quick" if args.quick else "paper"]
        self.device = args.device
        self.cuda = torch.device(self.device).type == "cuda"
        self.start = time.perf_counter()
        self.results = {"modes": {}, "checks": {}, "errors": {}, "skipped": [], "env": environment(args)}
        self.compiled = []
        self.graphs = False

    # -- bookkeeping --

    def left(self):
        return self.args.budget - (time.perf_counter() - self.start)

    def run(self, name, fn, estimate_s):
        if self.left() < estimate_s:
            logger.warning("skipping %s: %.0f s left, needs about %.0f s", name, self.left(), estimate_s)
            self.results["skipped"].append(name)
            return None
        logger.info("== %s (%.0f s left)", name, self.left())
        begin = time.perf_counter()
        # A mode that runs far past the budget (a compilation that never ends, say) is stopped, not waited for.
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(max(1, int(self.left() + 60)))
        try:
            value = fn()
        except Exception as e:  # a failing mode is reported, the run goes on
            logger.error("%s failed: %r", name, e)
            self.results["errors"][name] = {"error": repr(e)[:2000],
                                            "traceback": traceback.format_exc().splitlines()[-25:]}
            value = None
            if self.cuda:
                torch.cuda.empty_cache()
        finally:
            signal.alarm(0)
        logger.info("   %s took %.1f s", name, time.perf_counter() - begin)
        self.save()
        return value

    def save(self):
        self.results["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.results, indent=2, default=str))

    # -- pieces --

    def peak_matmul(self):
        n = self.shapes["peak_size"]
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
        _, seconds, _ = measure(lambda: a @ b, self.device, warmup=3, seconds=1.0, min_iters=10)
        self.results["peak_bf16_tflops"] = 2 * n**3 / seconds / 1e12
        return self.results["peak_bf16_tflops"]

    def setup(self):
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model, self.processors = build(self.shapes, self.device, dtype)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=self.cuda)
        self.results["params"] = {"total": sum(p.numel() for p in self.model.parameters()),
                                  "trainable": sum(p.numel() for p in trainable)}
        self.batches = {}

    def batch(self, n, window="trimmed", pad_to=None, video_output="normalized"):
        key = (n, window, pad_to, video_output)
        if key not in self.batches:
            self.batches[key] = make_batch(self.processors[window], n, self.shapes, self.device, pad_to=pad_to,
                                           video_output=video_output)
        return self.batches[key]

    def train_mode(self, name, n, *, window="trimmed", full_logits=False, decorrelation=decorrelation_loss,
                   pad_to=None, video_output="normalized", cached_media=False):
        batch = dict(self.batch(n, window, pad_to, video_output))
        if full_logits:
            batch.pop("logits_to_keep", None)
        if cached_media:
            media = {k: batch.pop(k) for k in ("input_features", "feature_attention_mask", "pixel_values_videos",
                                               "video_attention_mask")}
            with torch.no_grad():
                batch["media_tokens"] = self.model.encode_media(**media)
        step = train_step(self.model, self.optimizer, batch, decorrelation, self.graphs)
        # Compiled layers: the first call compiles (or recompiles for a new shape), CUDA-graph trees warm up on it
        # and record on the second; replays from the third.
        warmup = self.shapes["warmup"] + (1 if self.compiled else 0)
        warmup_s, seconds_per_step, peak = measure(step, self.device, warmup, self.shapes["measure_s"],
                                                   min_iters=1 if self.args.quick else 3)
        result = {"batch": n, "samples_per_s": n / seconds_per_step, "step_ms": 1e3 * seconds_per_step,
                  "peak_gib": peak, "warmup_s": warmup_s, "tokens": batch["input_ids"].shape[1],
                  "logits_to_keep": batch.get("logits_to_keep", 0)}
        # What the warm-up cost beyond its steps: compilation and CUDA-graph recording.
        result["compile_s"] = max(0.0, warmup_s - warmup * seconds_per_step)
        self.results["modes"][name] = result
        logger.info("   %s: %.1f samples/s, %.1f ms/step, peak %s GiB", name, result["samples_per_s"],
                    result["step_ms"], f"{peak:.2f}" if peak else "-")
        return result

    def original(self):
        self.model.set_attn_implementation("eager")
        try:
            n = self.shapes["batches"][0]
            return self.train_mode(f"original_b{n}", n, window="full", full_logits=True,
                                   decorrelation=per_layer_decorrelation)
        finally:
            self.model.set_attn_implementation("sdpa")

    def flops(self):
        """FLOPs of one training step (encoders forward, LLM forward and backward) per sample, counted eagerly."""
        from torch.utils.flop_counter import FlopCounterMode

        n = self.shapes["batches"][0]
        step = train_step(self.model, self.optimizer, self.batch(n), decorrelation_loss, graphs=False)
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        self.results["flops_per_sample"] = counter.get_total_flops() / n
        return self.results["flops_per_sample"]

    def transfer(self):
        """Host-to-device time of one batch-8 batch: float32 video vs uint8 video (pinned memory)."""
        n = self.shapes["batches"][0]
        out = {}
        for video_output in ("normalized", "uint8"):
            processor = self.processors["trimmed"]
            audio, video = clips(n, self.shapes["seconds"])
            processor.video_output = video_output
            try:
                host = dict(processor(audio=audio, videos=video))
            finally:
                processor.video_output = "normalized"
            if self.cuda:
                host = {k: v.pin_memory() for k, v in host.items()}
            _, seconds, _ = measure(lambda: {k: v.to(self.device, non_blocking=True) for k, v in host.items()},
                                    self.device, warmup=2, seconds=0.5)
            out[video_output] = {"ms": 1e3 * seconds, "mib": sum(v.numel() * v.element_size()
                                                                  for v in host.values()) / 2**20}
        self.results["modes"][f"transfer_b{n}"] = out
        return out

    def checks(self):
        """On this device: uint8 video == float video, and the fused decorrelation loss == the per-layer one."""
        n = self.shapes["batches"][0]
        floats = self.batch(n)
        uint8 = self.batch(n, video_output="uint8")
        normalised = self.model.model.normalize_video(uint8["pixel_values_videos"], uint8["video_attention_mask"])
        self.results["checks"]["uint8_video_bitwise_equal"] = bool(torch.equal(normalised,
                                                                               floats["pixel_values_videos"]))
        lora = [p for name, p in self.model.named_parameters() if p.requires_grad and "lora_A" in name]
        values, grads = {}, {}
        for name, fn in (("fused", decorrelation_loss), ("per_layer", per_layer_decorrelation)):
            out = self.model(**floats, output_hidden_states=True)
            loss = fn(out.hidden_states, floats["attention_mask"])
            values[name] = loss.item()
            grads[name] = torch.cat([g.float().flatten() for g in torch.autograd.grad(loss, lora, allow_unused=True)
                                     if g is not None])  # the last layer's LoRA does not reach the chosen layers
        difference = float((grads["fused"] - grads["per_layer"]).norm() / grads["per_layer"].norm())
        self.results["checks"]["decorrelation_fused_vs_per_layer"] = {
            "value_fused": values["fused"], "value_per_layer": values["per_layer"],
            "gradient_relative_difference": difference}
        return self.results["checks"]

    def transcription(self):
        """Utterances per second: batch-1 beam search, batched beam search (the prompt once per batch, and once per
        beam as GenerationMixin runs it), at two batch sizes, and batched greedy search."""
        s = self.shapes
        model = self.model.eval()
        norm = model.model.language_model.norm.weight
        # Random weights give near-uniform next-token distributions, whose ties bf16 noise breaks either way; a
        # sharper output (a power of two, undone exactly below) makes the comparison of transcripts meaningful.
        with torch.no_grad():
            norm.mul_(32.0)
        settings = dict(max_new_tokens=s["new_tokens"], min_new_tokens=s["new_tokens"], do_sample=False)
        out = {}
        try:
            single = [make_batch(self.processors["trimmed"], 1, s, self.device, labels=False, seed=1000 + i)
                      for i in range(s["beam_single"])]
            many = make_batch(self.processors["trimmed"], s["beam_batch"], s, self.device, labels=False, seed=7)
            for i, one in enumerate(single):  # the batch's first rows are the single utterances
                for key in one:
                    many[key][i] = one[key][0]
            greedy_batch = make_batch(self.processors["trimmed"], s["greedy_batch"], s, self.device, labels=False)
            larger = make_batch(self.processors["trimmed"], s["beam_batch_large"], s, self.device, labels=False)
            width = many["input_ids"].shape[1]
            singles = []

            def one_by_one():
                singles.clear()
                for one in single:
                    singles.append(model.generate(**one, num_beams=s["beams"], **settings)[0, width:])

            batched = {}

            def beams(generate):
                def run():
                    batched["ids"] = generate(model, **many, num_beams=s["beams"], **settings)[:, width:]
                return run

            def warm_single():
                model.generate(**single[0], num_beams=s["beams"], **settings)

            for name, fn, count, warm in (
                ("beam_batch1", one_by_one, len(single), warm_single),
                ("beam_batched", beams(LlamaAVSRForConditionalGeneration.generate), s["beam_batch"], None),
                ("beam_batched_prompt_every_beam", beams(GenerationMixin.generate), s["beam_batch"], None),
                ("greedy_batched", lambda: model.generate(**greedy_batch, num_beams=1, **settings), s["greedy_batch"],
                 None),
                ("beam_batched_large", lambda: model.generate(**larger, num_beams=s["beams"], **settings),
                 s["beam_batch_large"], None),
            ):
                with torch.no_grad():
                    _, seconds, peak = measure(fn, self.device, warmup=1, seconds=2 * s["measure_s"] / 3,
                                               min_iters=1, max_iters=3, warm=warm)
                out[name] = {"utterances": count, "utterances_per_s": count / seconds, "peak_gib": peak}
                logger.info("   %s: %.2f utterances/s", name, count / seconds)
                if name == "beam_batched":
                    reference = batched["ids"]
            with torch.no_grad():
                one_by_one()
            same = sum(int(torch.equal(a, b)) for a, b in zip(singles, reference[: len(singles)]))
            out["identical_transcripts"] = f"{same}/{len(singles)}"
        finally:
            with torch.no_grad():
                norm.div_(32.0)
            model.train()
        self.results["modes"]["transcription"] = out
        return out

    def compile(self, mode):
        """Compile the decoder and encoder layers; check the compiled step against the eager one on one batch."""
        if self.compiled:  # a previous attempt: back to eager first
            for module in self.compiled:
                del module.forward
            torch._dynamo.reset()
        n = self.shapes["batches"][0]
        batch = self.batch(n, pad_to=PAD_TO, video_output="uint8")
        eager_loss, eager_grads = trainable_gradients(self.model, batch, DECORRELATION_WEIGHT, self.graphs)
        kwargs = self.shapes["compile_kwargs"] or {"mode": mode}
        self.compiled = self.model.compile_layers(decoder=True, encoders=True, **kwargs)
        self.graphs = self.cuda and mode == "reduce-overhead"
        begin = time.perf_counter()
        compiled_loss, compiled_grads = trainable_gradients(self.model, batch, DECORRELATION_WEIGHT, self.graphs)
        check = self.results["checks"][f"compiled_vs_eager_{kwargs.get('mode', kwargs.get('backend'))}"] = {
            "loss_eager": eager_loss, "loss_compiled": compiled_loss,
            "gradient_relative_difference": float((compiled_grads - eager_grads).norm() / eager_grads.norm()),
            "first_call_s": time.perf_counter() - begin}
        # Record and replay CUDA graphs here, so that a mode that fails there falls back to the next one.
        step = train_step(self.model, self.optimizer, batch, decorrelation_loss, self.graphs)
        for _ in range(3):
            step()
        synchronize(self.device)
        check["with_three_steps_s"] = time.perf_counter() - begin
        self.results["compile_mode"] = kwargs.get("mode", kwargs.get("backend"))
        return check["first_call_s"]

    def liger(self):
        apply_liger_kernel_to_text_model(self.model)
        n = self.shapes["batches"][0]
        return self.train_mode(f"package_b{n}_liger_eager", n)

    def embedded_default(self):
        """run_avsr.py's default recipe (1200 utterances, 3 epochs, test WER) on the given offline components."""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import run_avsr

        a = self.args
        argv = ["--text_model", a.text_model, "--audio_encoder", a.audio_encoder, "--data_dir", a.embedded_default,
                "--output_dir", a.embedded_output, "--dataloader_num_workers", "4", "--per_device_eval_batch_size",
                "64", *a.embedded_args]
        begin = time.perf_counter()
        summary = run_avsr.main(argv)
        result = {"wall_s": time.perf_counter() - begin, "seconds": summary["seconds"],
                  "test": summary["test"], "argv": argv}
        self.results["modes"]["embedded_default"] = result
        return result


def _out_of_time(signum, frame):
    raise TimeoutError("ran past the time budget")


def environment(args):
    import peft
    import transformers

    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "device": args.device, "quick": args.quick, "budget_s": args.budget, "command": " ".join(sys.argv)}
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def ratio(a, b):
    return a / b if a and b else None


def summarise(results):
    """Ratios of the numbers measured in this run (None where a mode failed or was skipped)."""
    m = results["modes"]
    n0 = results["first_batch"]
    get = lambda mode, key: (m.get(mode) or {}).get(key)  # noqa: E731
    peak = results.get("peak_bf16_tflops")
    flops = results.get("flops_per_sample")
    rows = []

    def row(name, value, target=None, unit="x"):
        rows.append({"what": name, "value": value, "target": target, "unit": unit})

    original = get(f"original_b{n0}", "samples_per_s")
    for mode in (f"package_b{n0}", f"package_b{n0}_per_layer_decorrelation", f"fast_b{n0}",
                 f"fast_b{n0}_cached_media"):
        row(f"training b{n0} decorrelation on: {mode} / original", ratio(get(mode, "samples_per_s"), original),
            ">= 3" if mode == f"fast_b{n0}" else None)
    for prefix in (f"package_b{n0}", f"fast_b{n0}"):
        on, off = m.get(prefix) or {}, m.get(f"{prefix}_no_decorrelation") or {}
        if on and off:
            row(f"decorrelation time share, {prefix}", 100 * (1 - on["samples_per_s"] / off["samples_per_s"]) if
                on.get("samples_per_s") and off.get("samples_per_s") else None, "<= 2", "%")
            row(f"decorrelation peak-memory share, {prefix}", 100 * (1 - off["peak_gib"] / on["peak_gib"]) if
                on.get("peak_gib") and off.get("peak_gib") else None, "<= 1", "%")
    old = m.get(f"package_b{n0}_per_layer_decorrelation") or {}
    off = m.get(f"package_b{n0}_no_decorrelation") or {}
    if old and off and old.get("peak_gib") and off.get("peak_gib"):
        row(f"per-layer decorrelation time share, package_b{n0} (before)",
            100 * (1 - old["samples_per_s"] / off["samples_per_s"]), None, "%")
        row(f"per-layer decorrelation peak-memory share, package_b{n0} (before)",
            100 * (1 - off["peak_gib"] / old["peak_gib"]), None, "%")
    best = None
    for mode in sorted(m):
        if mode.startswith("fast_b") and "no_decorrelation" not in mode and "cached" not in mode and flops and peak:
            value = m[mode].get("samples_per_s")
            if value:
                mfu = 100 * flops * value / (peak * 1e12)
                m[mode]["mfu_percent"] = mfu
                row(f"MFU, {mode}", mfu, None, "%")
                best = max(best or 0.0, mfu)
    row("MFU at the best batch", best, ">= 40", "%")
    t = m.get("transcription") or {}
    single = (t.get("beam_batch1") or {}).get("utterances_per_s")
    row("transcription beam 15: batched / batch 1", ratio((t.get("beam_batched") or {}).get("utterances_per_s"),
                                                          single), ">= 20")
    row("transcription beam 15: larger batch / batch 1",
        ratio((t.get("beam_batched_large") or {}).get("utterances_per_s"), single), ">= 20")
    row("transcription beam 15, batched: prompt once per batch / on every beam",
        ratio((t.get("beam_batched") or {}).get("utterances_per_s"),
              (t.get("beam_batched_prompt_every_beam") or {}).get("utterances_per_s")))
    row("transcription greedy batched / beam 15 batch 1",
        ratio((t.get("greedy_batched") or {}).get("utterances_per_s"), single))
    rows.append({"what": "identical transcripts, batch 1 vs batched (beam 15)", "value": t.get(
        "identical_transcripts"), "target": "all", "unit": ""})
    transfer = m.get(f"transfer_b{n0}") or {}
    row(f"batch-{n0} host-to-device copy: float video / uint8 video",
        ratio((transfer.get("normalized") or {}).get("ms"), (transfer.get("uint8") or {}).get("ms")))
    results["summary"] = rows
    return rows


def print_table(results):
    print("\n==== bench_gpu: ratios measured in this run " + "=" * 40)
    print(f"{results['env'].get('gpu', results['env']['device'])}, torch {results['env']['torch']}, transformers "
          f"{results['env']['transformers']}, peak bf16 {results.get('peak_bf16_tflops') or float('nan'):.0f} "
          f"TFLOP/s, {results.get('elapsed_s')} s")
    for mode, r in results["modes"].items():
        if isinstance(r, dict) and "samples_per_s" in r:
            print(f"  {mode:<38} {r['samples_per_s']:8.1f} samples/s {r['step_ms']:8.1f} ms  peak "
                  f"{r['peak_gib'] or float('nan'):6.2f} GiB  compile {r['compile_s']:6.1f} s")
    for r in results["summary"]:
        value = r["value"]
        shown = f"{value:.2f}{r['unit']}" if isinstance(value, float) else str(value)
        target = f"  (target {r['target']}{r['unit']})" if r["target"] else ""
        print(f"  {r['what']:<66} {shown:>10}{target}")
    for name, error in results["errors"].items():
        print(f"  FAILED {name}: {error['error'][:300]}")
    if results["skipped"]:
        print(f"  skipped for time: {', '.join(results['skipped'])}")


# ---- several GPUs: DDP and FSDP through accelerate against one GPU (issue 13) ------------------------------------

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate"
# NVLink multicast can take a shared host's GPUs out of service: off in every process the multi-GPU runs start.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MULTI_GPU_STEPS = {"paper": 20, "quick": 6}  # loss-curve steps; every run trains EPOCH_STEPS more
EPOCH_STEPS = 4  # steps of one epoch at the global batch 2b: the first fills the batch cache and is not timed
SEED = 0


class IndexedClips(torch.utils.data.Dataset):
    """The clips of `clips()` with their transcripts; items are indices, which CachedCollator turns into batches."""

    def __init__(self, n, shapes, processor):
        self.audio, self.video = clips(n, shapes["seconds"], seed=SEED)
        self.text = transcripts(processor, self.audio, self.video, shapes["tokens"])

    def __len__(self):
        return len(self.text)

    def __getitem__(self, i):
        return i


class CachedCollator:
    """The processor's batch for a set of clips, made once: from the second epoch on, steps are the GPUs' alone."""

    def __init__(self, data, processor):
        self.data, self.processor, self.cache = data, processor, {}

    def __call__(self, indices):
        key = tuple(indices)
        if key not in self.cache:
            self.cache[key] = dict(self.processor(audio=[self.data.audio[i] for i in key],
                                                  videos=[self.data.video[i] for i in key],
                                                  text=[self.data.text[i] for i in key]))
        return self.cache[key]


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step (once the device has finished it), and the memory the model holds
    once wrapped: Trainer prepares the model (DDP, FSDP) before on_train_begin, so the peak counted from there on is
    training's, not that of the whole model that each process built before FSDP sharded it."""

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


def fingerprint(model) -> float:
    """A sum over every weight: equal in two runs (or processes) only if they start from the same model."""
    with torch.no_grad():
        return float(sum(p.detach().sum(dtype=torch.float64) for p in model.parameters()))


def multi_gpu_train(model, processor, data, batch, steps, output_dir, quick):
    """`steps` AVSRTrainer steps at `batch` per process; losses, samples/s over the cached steps, memory per GPU."""
    args = AVSRTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
        lr_scheduler_type="constant", adam_beta2=0.98, weight_decay=0.1, max_grad_norm=10.0,
        decorrelation_weight=1e4, decorrelation_layers="reference", decorrelation_tokens="prefix",
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=SEED, bf16=not quick, use_cpu=quick,
        ddp_find_unused_parameters=False,  # every trained tensor is used in every step
    )
    clock = StepClock()
    trainer = AVSRTrainer(model=model, args=args, train_dataset=data, data_collator=CachedCollator(data, processor),
                          processing_class=processor, callbacks=[clock])
    trainer.train()
    global_batch = batch * trainer.accelerator.num_processes
    first = len(data) // global_batch  # the steps of the first epoch: uncached batches, warm-up
    timed = len(clock.ends) - first
    seconds = clock.ends[-1] - clock.ends[first - 1]
    peaks = resident = None  # a CPU has no allocator statistics
    if torch.cuda.is_available():
        memory = torch.tensor([[torch.cuda.max_memory_allocated() / 2**30, clock.resident_gib]],
                              device=trainer.args.device)
        peaks, resident = trainer.accelerator.gather(memory).T.tolist()
    logs = [log for log in trainer.state.log_history if "loss" in log and "step" in log]
    result = {
        "processes": trainer.accelerator.num_processes, "per_device_batch": batch, "global_batch": global_batch,
        "distributed_type": str(trainer.accelerator.distributed_type).removeprefix("DistributedType."),
        "sharded": trainer.is_fsdp_enabled, "mixed_precision": trainer.accelerator.mixed_precision,
        "timed_steps": timed, "samples_per_s": global_batch * timed / seconds, "step_ms": 1000 * seconds / timed,
        "model_gib_per_device": resident, "peak_gib_per_device": peaks,
        "loss": [log["loss"] for log in logs], "ce_loss": [log["ce_loss"] for log in logs],
        "decor_loss": [log["decor_loss"] for log in logs],
    }
    trainer.accelerator.wait_for_everyone()
    return trainer, result


def multi_gpu_worker(args):
    """One run (in each of its processes): `one` trains at b and then 2b on one device, `ddp`/`fsdp` at b per
    process under `accelerate launch`. The main process writes the results to --result; then the process exits."""
    from accelerate import PartialState

    logging.basicConfig(level=logging.WARNING)
    shapes = SHAPES["quick" if args.quick else "paper"]
    batch = args.batch or shapes["batches"][0]
    steps = (args.steps or MULTI_GPU_STEPS["quick" if args.quick else "paper"]) + EPOCH_STEPS
    state = PartialState(cpu=args.quick)
    device = "cpu" if args.quick else f"cuda:{state.local_process_index}"
    name = args.multi_gpu_worker
    runs = {}
    for run, per_device in ([("one_b", batch), ("one_2b", 2 * batch)] if name == "one" else [(name, batch)]):
        torch.manual_seed(SEED)
        # bf16 weights on a GPU (fp32 on a CPU); the trained tensors in fp32 in every run, so that DDP and one GPU
        # update what FSDP updates (accelerate's FSDP keeps fp32 masters of them under mixed precision).
        model, processors = build(shapes, device, torch.float32 if args.quick else torch.bfloat16)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        start = fingerprint(model)
        if state.num_processes > 1:  # FSDP shards each process's own copy: the copies must be equal
            prints = [None] * state.num_processes
            torch.distributed.all_gather_object(prints, start)
            if len(set(prints)) != 1:
                raise RuntimeError(f"the processes built different weights: {prints}")
        data = IndexedClips(EPOCH_STEPS * 2 * batch, shapes, processors["trimmed"])
        with tempfile.TemporaryDirectory() as output_dir:
            trainer, result = multi_gpu_train(model, processors["trimmed"], data, per_device, steps, output_dir,
                                              args.quick)
        result.update(weights_fingerprint=start, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
                      device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        runs[run] = result
        trainer.accelerator.free_memory()
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if state.is_main_process:
        Path(args.result).write_text(json.dumps(runs, indent=1))
    state.wait_for_everyone()  # the results are written before either process tears the group down
    state.destroy_process_group()
    # A worker is a process of its own (start_multi_gpu_run checks its exit status and reads --result): it leaves
    # without running destructors, since gloo's threads can abort the interpreter's teardown after the work is done
    # ("terminate called without an active exception", seen in CI). An exception above still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_multi_gpu_run(name, args, result):
    """Run `name` in processes of its own (accelerate launch for ddp/fsdp) and return its results."""
    script = [str(Path(__file__).resolve()), "--multi-gpu-worker", name, "--result", str(result)]
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
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ACCELERATE_CONFIGS / f"{name}.yaml"), "--num_processes", str(args.gpus),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
        if args.quick:  # the YAMLs are for GPUs: bf16 autocast and NCCL there, fp32 and gloo here
            command += ["--mixed_precision", "no"]
            env["OMP_NUM_THREADS"] = "1"
        command += script
    logger.info("%s: %s", name, " ".join(command))
    begin = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed ({done.returncode}):\n{done.stderr[-6000:]}")
    runs = json.loads(Path(result).read_text())
    for run in runs.values():
        run["wall_s"] = round(time.perf_counter() - begin, 1)
        run["command"] = " ".join(command)
    return runs


def largest_relative_difference(curve, reference):
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(curve, reference))


def compare_multi_gpu(runs, steps):
    """The numbers the issue asks for, from the runs present."""
    summary = {}
    one_b, one_2b, ddp, fsdp = (runs.get(k) for k in ("one_b", "one_2b", "ddp", "fsdp"))
    if one_b and ddp:
        summary["ddp_speedup_vs_one_gpu_same_per_gpu_batch"] = ddp["samples_per_s"] / one_b["samples_per_s"]
    if ddp and fsdp:
        summary["fsdp_samples_per_s_vs_ddp"] = fsdp["samples_per_s"] / ddp["samples_per_s"]
        if fsdp["peak_gib_per_device"] and ddp["peak_gib_per_device"]:
            summary["fsdp_vs_ddp_peak_gib_per_gpu"] = [max(fsdp["peak_gib_per_device"]),
                                                       max(ddp["peak_gib_per_device"])]
            summary["fsdp_vs_ddp_model_gib_per_gpu"] = [max(fsdp["model_gib_per_device"]),
                                                        max(ddp["model_gib_per_device"])]
    for name, run in (("ddp", ddp), ("fsdp", fsdp)):
        if run and one_2b and run["weights_fingerprint"] == one_2b["weights_fingerprint"]:
            summary[f"{name}_loss_vs_one_gpu_2b_max_rel_diff"] = largest_relative_difference(
                run["loss"][:steps], one_2b["loss"][:steps])
    return summary


def multi_gpu_table(report):
    lines = ["| run | processes | distributed | per-GPU batch | samples/s | step ms | model GiB per GPU | "
             "peak GiB per GPU |", "|---|---|---|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        model, peaks = (", ".join(f"{p:.1f}" for p in run[key] or []) or "-"
                        for key in ("model_gib_per_device", "peak_gib_per_device"))
        lines.append(f"| {name} | {run['processes']} | {run['distributed_type']} | {run['per_device_batch']} | "
                     f"{run['samples_per_s']:.1f} | {run['step_ms']:.0f} | {model} | {peaks} |")
    lines += ["", *(f"- {key}: {value}" for key, value in report["summary"].items())]
    return "\n".join(lines)


def multi_gpu(args):
    """The driver: the runs one after the other, their comparison, a JSON report (rewritten after every run)."""
    import accelerate
    import peft
    import transformers

    if not args.quick and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"{args.gpus} GPUs needed, {torch.cuda.device_count()} visible (--quick runs on the CPU)")
    steps = args.steps or MULTI_GPU_STEPS["quick" if args.quick else "paper"]
    report = {"env": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                      "peft": peft.__version__, "command": " ".join(sys.argv), "quick": args.quick,
                      "visible_gpus": torch.cuda.device_count(), **NO_MULTICAST},  # GPU names: from the workers
              "runs": {}, "summary": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.multi_gpu_runs.split(","):
            report["runs"].update(start_multi_gpu_run(name, args, Path(scratch) / f"{name}.json"))
            report["summary"] = compare_multi_gpu(report["runs"], steps)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1))
    print(multi_gpu_table(report))
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: check every code path (CPU, < 1 min)")
    parser.add_argument("--out", default="bench_gpu.json", help="JSON with every number (rewritten after each mode)")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 345; 300 with --quick)")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode of the fast path")
    parser.add_argument("--embedded-default", default=None, help="a synthetic corpus folder: time run_avsr.py on it")
    parser.add_argument("--text-model", default="smollm2-135m")
    parser.add_argument("--audio-encoder", default="whisper-tiny.en")
    parser.add_argument("--embedded-output", default="/tmp/bench_gpu_run_avsr")
    parser.add_argument("--multi-gpu", action="store_true",
                        help="DDP and FSDP through accelerate against one GPU instead (see above)")
    parser.add_argument("--multi-gpu-runs", default="one,ddp,fsdp", help="--multi-gpu: which runs, in this order")
    parser.add_argument("--gpus", type=int, default=2, help="--multi-gpu: processes of the ddp and fsdp runs")
    parser.add_argument("--batch", type=int, default=None, help="--multi-gpu: per-GPU batch b (8; quick: 2)")
    parser.add_argument("--steps", type=int, default=None, help="--multi-gpu: loss-curve steps (20; quick: 6)")
    parser.add_argument("--multi-gpu-worker", choices=["one", "ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--embedded-args", nargs=argparse.REMAINDER, default=[],
                        help="more run_avsr.py arguments (last on the command line)")
    args = parser.parse_args(argv)
    if args.multi_gpu or args.multi_gpu_worker:
        os.environ.update(NO_MULTICAST)
        if args.multi_gpu_worker:
            return multi_gpu_worker(args)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return multi_gpu(args)
    if args.budget is None:
        args.budget = 300.0 if args.quick else 345.0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    bench = Bench(args)
    b = bench.shapes["batches"]
    n0 = bench.results["first_batch"] = b[0]
    heavy = 1.0 if args.quick else 4.0  # rough seconds of one eager batch-8 mode

    bench.run("peak_bf16_matmul", bench.peak_matmul, 1)
    bench.run("setup", bench.setup, 1)
    if "setup" in bench.results["errors"]:
        summarise(bench.results)
        bench.save()
        print_table(bench.results)
        return bench.results
    bench.run(f"original_b{n0}", bench.original, 2 * heavy)
    bench.run(f"package_b{n0}", lambda: bench.train_mode(f"package_b{n0}", b[0]), heavy)
    bench.run(f"package_b{n0}_no_decorrelation",
              lambda: bench.train_mode(f"package_b{n0}_no_decorrelation", b[0], decorrelation=None), heavy)
    bench.run(f"package_b{n0}_per_layer_decorrelation", lambda: bench.train_mode(
        f"package_b{n0}_per_layer_decorrelation", b[0], decorrelation=per_layer_decorrelation), heavy)
    bench.run("flops", bench.flops, heavy)
    bench.run("checks", bench.checks, heavy)
    bench.run(f"transfer_b{n0}", bench.transfer, 0.5 * heavy)
    bench.run("transcription", bench.transcription, 8 * heavy)
    compiled = bench.run("compile", lambda: bench.compile(args.compile_mode), 20 * heavy)
    if compiled is None and args.compile_mode != "default" and bench.cuda:
        compiled = bench.run("compile_default_mode", lambda: bench.compile("default"), 20 * heavy)
    if compiled is not None:
        fast = dict(pad_to=PAD_TO, video_output="uint8")
        bench.run(f"fast_b{n0}", lambda: bench.train_mode(f"fast_b{n0}", b[0], **fast), heavy)
        bench.run(f"fast_b{n0}_no_decorrelation", lambda: bench.train_mode(
            f"fast_b{n0}_no_decorrelation", b[0], decorrelation=None, **fast), heavy)
        bench.run(f"fast_b{n0}_cached_media", lambda: bench.train_mode(
            f"fast_b{n0}_cached_media", b[0], cached_media=True, **fast), 2 * heavy)
        for n in b[1:]:
            bench.run(f"fast_b{n}", lambda n=n: bench.train_mode(f"fast_b{n}", n, **fast), (n / b[0]) * heavy +
                      15 * heavy)
    if importlib_available("liger_kernel") and bench.cuda:
        # Liger's patch is not undone: it runs last. Compiled layers back to eager first (Triton under inductor is
        # another experiment).
        for module in bench.compiled:
            del module.forward
        bench.compiled, bench.graphs = [], False
        bench.run("liger", bench.liger, 2 * heavy)
    if args.embedded_default:
        bench.run("embedded_default", bench.embedded_default, 60)
    summarise(bench.results)
    bench.save()
    print_table(bench.results)
    return bench.results


def importlib_available(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
