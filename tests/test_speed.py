"""The fast paths equal the plain ones (tiny configs, CPU): generate() encoding once per batch, the decorrelation
loss against the per-layer formula, a training forward that never reads a tensor value, compiled layers, uint8
video, padded shapes, cached and shared encoder outputs. Liger kernels need a GPU (Triton)."""

import copy
import gc

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationMixin

from trainer import AVSRTrainer, AVSRTrainingArguments, decorrelation_loss
from trainer.avsr_trainer import LogitsToKeepCollator, apply_liger_kernel_to_text_model
from trainer.decorrelation import layer_indices

from test_trainer import TARGETS, Clips, ProcessorCollator, build
from tiny import random_clips


def batch(processor, n, text=True, seed=0, seconds=(0.4, 1.2)):
    clips = random_clips(n, seed, seconds)
    return processor(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=TARGETS[:n] if text else None)


def encoder_batch_sizes(model):
    """Batch sizes each encoder runs on, recorded by forward hooks."""
    sizes = []
    for name, encoder in (("audio", model.model.audio_encoder), ("video", model.model.video_encoder)):
        if encoder is not None:
            encoder.register_forward_hook(lambda m, a, kw, out, name=name: sizes.append((name, out[0].shape[0])),
                                          with_kwargs=True)
    return sizes


# ---- generate(): the encoders once per batch -------------------------------------------------------------------


def test_beam_search_encodes_once_and_equals_encoding_every_beam():
    model, processor = build("avsr")
    model.eval()
    inputs = batch(processor, 3, text=False)
    sizes = encoder_batch_sizes(model)
    shapes = []  # (rows, positions) of each language-model call
    model.model.language_model.register_forward_hook(
        lambda m, a, kw, out: shapes.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True)
    settings = dict(num_beams=4, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6, output_scores=True,
                    return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    length = inputs["input_ids"].shape[1]
    once = model.generate(**inputs, **settings)
    assert sizes == [("audio", 3), ("video", 3)]  # not 3 x 4 beams
    assert shapes[:2] == [(3, length - 1), (12, 1)]  # the prompt once per sample; its last token starts the beams
    sizes.clear()
    shapes.clear()
    every_beam = GenerationMixin.generate(model, **inputs, **settings)  # the media copied to every beam, then encoded
    assert sizes == [("audio", 12), ("video", 12)] and shapes[0] == (12, length)
    assert once.sequences.tolist() == every_beam.sequences.tolist()
    assert once.sequences[:, : inputs["input_ids"].shape[1]].tolist() == inputs["input_ids"].repeat_interleave(
        2, 0).tolist()
    torch.testing.assert_close(once.sequences_scores, every_beam.sequences_scores)

    given = model.generate(**inputs, media_tokens=model.encode_media(
        inputs["input_features"], inputs["feature_attention_mask"], inputs["pixel_values_videos"],
        inputs["video_attention_mask"]), **settings)
    assert given.sequences.tolist() == once.sequences.tolist()


# ---- the decorrelation loss against the per-layer formula ------------------------------------------------------


def per_layer_decorrelation(hidden_states, attention_mask, token_mask=None, layers="paper"):
    """The formula as first written: a float32 copy and F.normalize per layer, differentiated by autograd."""
    indices = layer_indices(len(hidden_states), layers)
    attended = attention_mask.bool()
    bos = attended.to(torch.uint8).argmax(-1)
    eligible = attended & (torch.arange(attended.shape[-1]) != bos.unsqueeze(-1))
    if token_mask is not None:
        eligible = eligible & token_mask
    squared = 0.0
    for index in indices:
        unit = F.normalize(hidden_states[index].float(), dim=-1, eps=1e-6)
        unit_bos = unit.gather(1, bos.view(-1, 1, 1).expand(-1, 1, unit.shape[-1]))
        squared = squared + (unit * unit_bos).sum(-1).square()
    weights = eligible.float()
    counts = weights.sum(-1)
    per_sample = (squared * weights).sum(-1) / (counts * len(indices)).clamp(min=1)
    has_tokens = (counts > 0).float()
    return (per_sample * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def residual_chain(x, weights, dtype):
    """A tiny residual network whose hidden-state tuple looks like a decoder's (embeddings, then each layer)."""
    hidden = [x.to(dtype)]
    for w in weights:
        hidden.append(torch.tanh(hidden[-1] @ w.to(dtype)) + hidden[-1])
    return tuple(hidden)


def chain_gradients(loss_fn, dtype, layers, token_mask=None, seed=0):
    torch.manual_seed(seed)
    common = 3 * torch.randn(16)  # a shared direction: cosines near 1, where float32 matters
    x = (torch.randn(3, 7, 16) + common).requires_grad_()
    weights = [(0.3 * torch.randn(16, 16)).requires_grad_() for _ in range(5)]
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    hidden = residual_chain(x, weights, dtype)
    decor = loss_fn(hidden, mask, token_mask, layers=layers)
    (hidden[-1].float().square().mean() + 3.0 * decor).backward()
    return decor.detach(), [x.grad, *(w.grad for w in weights)]


@pytest.mark.parametrize("layers", ["paper", "reference", [1, 1, 4]])
def test_fused_decorrelation_equals_per_layer_formula(layers):
    token_mask = torch.rand(3, 7) > 0.3
    for mask in (None, token_mask):
        got, got_grads = chain_gradients(decorrelation_loss, torch.float32, layers, mask)
        expected, expected_grads = chain_gradients(per_layer_decorrelation, torch.float32, layers, mask)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_fused_decorrelation_in_bf16_is_as_accurate_as_per_layer():
    # Nearly aligned to BOS (cos^2 ~ 0.9999): both must stay at bf16's rounding of the gradient, ~2^-9.
    torch.manual_seed(3)
    base = 4 * torch.randn(1, 1, 64)
    hidden16 = tuple((base + 0.02 * torch.randn(4, 20, 64)).bfloat16() for _ in range(6))
    mask = torch.ones(4, 20)
    hidden64 = tuple(h.double().requires_grad_() for h in hidden16)
    truth = torch.autograd.grad(per_layer_decorrelation(hidden64, mask), hidden64[2:5])
    for loss_fn in (decorrelation_loss, per_layer_decorrelation):
        hidden = tuple(h.clone().requires_grad_() for h in hidden16)
        grads = torch.autograd.grad(loss_fn(hidden, mask), hidden[2:5])
        for g, t in zip(grads, truth):
            assert g.dtype == torch.bfloat16
            assert float((g.double() - t).norm() / t.norm()) < 4e-3


def test_fused_decorrelation_alone_dropped_and_repeated_backward():
    mask = torch.ones(3, 7)
    mask[0, :2] = 0
    leaves = tuple(torch.randn(3, 7, 16, requires_grad=True) for _ in range(6))
    expected = torch.autograd.grad(per_layer_decorrelation(leaves, mask), leaves[2:5])
    got = torch.autograd.grad(decorrelation_loss(leaves, mask), leaves[2:5])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    decorrelation_loss(leaves, mask).backward()  # on leaves: .grad of the chosen entries only
    assert leaves[1].grad is None and leaves[5].grad is None
    for leaf, e in zip(leaves[2:5], expected):
        torch.testing.assert_close(leaf.grad, e)

    # The hidden states' Python objects gone before backward (Trainer drops the outputs), and a graph kept for a
    # second backward pass, with a backward pass in between that does not go through the loss.
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, requires_grad=True)
    weights = [0.3 * torch.randn(16, 16) for _ in range(5)]

    def gradient(loss):
        x.grad = None
        loss.backward(retain_graph=True)
        return x.grad.clone()

    hidden = residual_chain(x, weights, torch.float32)
    loss, plain = hidden[-1].sum() + decorrelation_loss(hidden, mask), hidden[-1].sum()
    del hidden
    gc.collect()
    first, without, again = gradient(loss), gradient(plain), gradient(loss)
    hidden = residual_chain(x, weights, torch.float32)
    torch.testing.assert_close(first, gradient(hidden[-1].sum() + per_layer_decorrelation(hidden, mask)))
    torch.testing.assert_close(without, gradient(hidden[-1].sum()))
    torch.testing.assert_close(again, first)


def saved_bytes(fn):
    """Bytes autograd saves for backward while `fn` runs (tensors it saves, beyond those passed in)."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(sizes)


def test_fused_decorrelation_keeps_no_float32_copies():
    hidden = tuple(torch.randn(4, 30, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(8))
    mask = torch.ones(4, 30)
    layer_bytes = hidden[0].numel() * 4  # one float32 copy of one layer
    assert saved_bytes(lambda: per_layer_decorrelation(hidden, mask)) > 6 * layer_bytes
    assert saved_bytes(lambda: decorrelation_loss(hidden, mask)) == 0


# ---- the training forward reads no tensor value (no host-device synchronisation) ---------------------------------


class ValueReads(TorchDispatchMode):
    """Records the aten calls that copy a tensor value to the host (.item(), bool(), .tolist(), nonzero)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_training_step_on_an_accelerator_reads_no_tensor_value():
    # On the meta device nothing can be read back: a training step (forward, decorrelation loss, backward) that
    # runs there reads no value, so on a GPU it never waits for the device. On the CPU the placeholder counts are
    # still checked (free there); in evaluation everywhere.
    model, processor = build("avsr")
    inputs = batch(processor, 3)
    model.train()
    with ValueReads() as cpu:
        out = model(**inputs, output_hidden_states=True)
        (out.loss + decorrelation_loss(out.hidden_states, inputs["attention_mask"])).backward()
    assert len(cpu.reads) == 2  # the two placeholder checks
    model.to("meta")
    meta = {k: v.to("meta") for k, v in inputs.items()}
    with ValueReads() as reads:
        out = model(**meta, output_hidden_states=True)
        loss = out.loss + decorrelation_loss(out.hidden_states, meta["attention_mask"])
        loss.backward()
    assert reads.reads == [] and loss.device.type == "meta"
    assert out.past_key_values is None  # no cache is built in training


def test_training_mask_equals_transformers_mask():
    model, processor = build("avsr")
    inputs = batch(processor, 3)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
        model.train()  # no dropout anywhere in the tiny model: only the mask and the cache differ
        trained = model(**inputs).logits
    torch.testing.assert_close(trained, reference)


# ---- compiled layers ---------------------------------------------------------------------------------------------


def test_compiled_layers_equal_eager():
    from torch._dynamo.utils import counters

    model, processor = build("avsr")
    inputs = batch(processor, 3)
    compiled = copy.deepcopy(model)
    compiled.compile_layers(decoder=True, encoders=True)

    def step(m):
        m.train()
        m.zero_grad()
        out = m(**inputs, output_hidden_states=True)
        loss = out.loss + 10 * decorrelation_loss(out.hidden_states, inputs["attention_mask"])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss, grads = step(model)
    compiled_loss, compiled_grads = step(compiled)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(compiled_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5 * grad.abs().max())
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():  # evaluation runs the decoder layers eagerly: nothing new to compile
        torch.testing.assert_close(compiled.eval()(**inputs).loss, model.eval()(**inputs).loss)
    assert counters["stats"]["unique_graphs"] == graphs


# ---- uint8 video, normalised on the device -------------------------------------------------------------------


def test_uint8_video_equals_normalised_video():
    model, processor = build("avsr")
    model.eval()
    clips = random_clips(3, seed=2)
    floats = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=TARGETS[:3])
    processor.video_output = "uint8"
    uint8 = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=TARGETS[:3])
    assert uint8["pixel_values_videos"].dtype == torch.uint8
    normalised = model.model.normalize_video(uint8["pixel_values_videos"], uint8["video_attention_mask"])
    assert torch.equal(normalised, floats["pixel_values_videos"])  # bit for bit, padding included
    with torch.no_grad():
        assert torch.equal(model(**uint8).logits, model(**floats).logits)


# ---- static shapes -------------------------------------------------------------------------------------------


def test_padding_to_a_multiple_keeps_the_loss():
    model, processor = build("avsr")
    model.eval()
    clips = random_clips(3, seed=4)
    rows = [{"audio": a, "video": v, "text": TARGETS[i]} for i, (a, v) in enumerate(clips)]
    plain = LogitsToKeepCollator(ProcessorCollator(processor))(rows)
    padded = LogitsToKeepCollator(ProcessorCollator(processor), pad_to_multiple_of=16,
                                  pad_token_id=processor.tokenizer.pad_token_id)(rows)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert padded["logits_to_keep"] % 16 == 0 or padded["logits_to_keep"] == padded["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).loss, model(**plain).loss)
    with pytest.raises(ValueError, match="pad_token_id"):
        LogitsToKeepCollator(ProcessorCollator(processor), pad_to_multiple_of=16)


# ---- encoder outputs: cached across epochs, shared by the evaluation loss and generate() ------------------------


class KeyedClips(Clips):
    """Clips with an `audio_path` column that names them, as the loaders' rows do."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "audio_path": f"clip-{i}"}


class DeterministicCollator(ProcessorCollator):
    augments = False


def avsr_trainer(tmp_path, **overrides):
    model, processor = build("avsr")
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                    num_train_epochs=3, learning_rate=2e-2, decorrelation_weight=10.0, report_to="none",
                    save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
                    generation_max_new_tokens=4)
    settings.update(overrides)
    return AVSRTrainer(model=model, args=AVSRTrainingArguments(**settings), train_dataset=KeyedClips(4),
                       eval_dataset=KeyedClips(4, seed=1), data_collator=DeterministicCollator(processor),
                       processing_class=processor)


def test_cached_encoder_outputs_equal_live_ones(tmp_path):
    # Whisper on its full 30-s window and the masked AV-HuBERT do not depend on the rest of the batch, so after the
    # first epoch the cache serves the same tokens as the encoders would, in reshuffled batches.
    live = avsr_trainer(tmp_path / "live")
    live.train()
    cached = avsr_trainer(tmp_path / "cached", cache_encoder_outputs=True)
    sizes = encoder_batch_sizes(cached.model)
    cached.train()
    assert len(cached._media_cache) == 4
    assert len(sizes) == 2 * 2  # audio and video, for the first epoch's two batches only
    live_losses = [log["loss"] for log in live.state.log_history if "loss" in log]
    cached_losses = [log["loss"] for log in cached.state.log_history if "loss" in log]
    assert len(cached_losses) == 6
    assert cached_losses == pytest.approx(live_losses, rel=1e-4)
    for (name, param), (_, cached_param) in zip(live.model.named_parameters(), cached.model.named_parameters()):
        torch.testing.assert_close(cached_param, param, rtol=1e-4, atol=1e-6, msg=name)


def test_cache_refuses_augmentation_and_trainable_encoders(tmp_path):
    class Augmenting(ProcessorCollator):
        augments = True

    model, processor = build("avsr")
    args = AVSRTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                 cache_encoder_outputs=True)
    with pytest.raises(ValueError, match="without augmentation"):
        AVSRTrainer(model=model, args=args, train_dataset=KeyedClips(2), data_collator=Augmenting(processor),
                    processing_class=processor)
    model.model.video_encoder.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen encoders"):
        AVSRTrainer(model=model, args=args, train_dataset=KeyedClips(2),
                    data_collator=DeterministicCollator(processor), processing_class=processor)


def test_evaluation_encodes_each_batch_once(tmp_path):
    trainer = avsr_trainer(tmp_path, max_steps=1)
    sizes = encoder_batch_sizes(trainer.model)
    metrics = trainer.evaluate()
    assert sizes == [("audio", 2), ("video", 2)] * 2  # two batches; the loss and generate() share each encoding
    assert 0 <= metrics["eval_wer"] and metrics["eval_ce_loss"] > 0


def test_trainer_refuses_a_processor_with_other_rates(tmp_path):
    model, _ = build("avsr")
    _, processor = build("avsr")
    processor.audio_compression_rate = model.config.audio_compression_rate + 1
    with pytest.raises(ValueError, match="audio_compression_rate"):
        AVSRTrainer(model=model, args=AVSRTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                    train_dataset=KeyedClips(2), data_collator=ProcessorCollator(processor),
                    processing_class=processor)


# ---- Liger kernels (Triton: GPU only) ----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton kernels: they need a GPU")
def test_liger_kernels_keep_gradients_with_the_decorrelation_loss(monkeypatch):
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    # Liger replaces functions of transformers' Llama module: put them back after the test.
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    model, processor = build("avsr")
    model.to("cuda").train()
    inputs = {k: v.to("cuda") for k, v in batch(processor, 3).items()}

    def gradients(m):
        m.zero_grad()
        out = m(**inputs, output_hidden_states=True)
        (out.loss + 10 * decorrelation_loss(out.hidden_states, inputs["attention_mask"])).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    expected = gradients(model)
    patched = copy.deepcopy(model)
    apply_liger_kernel_to_text_model(patched)
    assert type(patched.model.language_model.layers[0].mlp).__name__ != "LlamaMLP" or \
        patched.model.language_model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"
    got = gradients(patched)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max(), msg=name)


# ---- the GPU benchmark's code paths, on the CPU ---------------------------------------------------------------------


def test_bench_gpu_quick_runs_every_mode(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    results = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--budget", "100000"])
    assert results["errors"] == {} and results["skipped"] == []
    assert json.loads(out.read_text())["summary"] == results["summary"]
    modes = results["modes"]
    for mode in ("original_b2", "package_b2", "package_b2_no_decorrelation", "fast_b2", "fast_b2_cached_media",
                 "fast_b4"):
        assert modes[mode]["samples_per_s"] > 0, mode
    assert modes["fast_b2"]["tokens"] % bench.PAD_TO == 0 and modes["original_b2"]["logits_to_keep"] == 0
    transcription = modes["transcription"]
    assert set(transcription) >= {"beam_batch1", "beam_batched", "beam_batched_prompt_every_beam", "greedy_batched"}
    checks = results["checks"]
    assert checks["uint8_video_bitwise_equal"]
    assert checks["decorrelation_fused_vs_per_layer"]["gradient_relative_difference"] < 1e-5
    assert checks["compiled_vs_eager_eager"]["gradient_relative_difference"] < 1e-5
    assert results["flops_per_sample"] > 0


def test_compiled_gradient_check_measures_its_noise_floors(tmp_path):
    """check_compiled_gradients.py (which explains bench_gpu's bf16 compiled-vs-eager gap on the GPU) on the quick
    shapes: float32 dynamo reproduces eager exactly, and bf16 rounding is a floor above zero for the comparison."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "check_compiled_gradients.py"
    spec = importlib.util.spec_from_file_location("check_compiled_gradients", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "gradients.json"
    results = check.main(["--quick", "--batch", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    for row in results["checks"].values():
        assert row["float32_eager_again_vs_eager"] < 1e-6
        assert row["float32_compiled_vs_eager"] < 1e-5
        assert 1e-4 < row["bfloat16_eager_vs_float32_eager"] < 0.1
        assert row["bfloat16_compiled_vs_eager"] <= row["bfloat16_eager_vs_float32_eager"] + 1e-6
