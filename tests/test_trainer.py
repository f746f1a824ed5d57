"""Fast tests of trainer/: decorrelation loss against a plain loop over eq. 10, WER, prompt rebuilding, and the
Trainer's scaling under gradient accumulation, two processes and checkpoint resumption (tiny configs, CPU)."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
from trainer import AVSRTrainer, AVSRTrainingArguments, decorrelation_loss, prompt_only, word_error_rate
from trainer.avsr_trainer import LogitsToKeepCollator

from tiny import random_clips, tiny_config, tiny_processor, tiny_tokenizer

TESTS_DIR = Path(__file__).resolve().parent
TARGETS = ["place blue at f two now", "red green by one", "place red in three now", "blue at two", "green now",
           "place one by f three in red"]


# ---- decorrelation_loss against a straightforward loop ---------------------------------------------------------------


def loop_decorrelation(hidden_states, attention_mask, token_mask, layer_ids):
    """Eq. 10 / DESIGN.md written out one sample, one layer, one token at a time, in float64."""
    per_sample = []
    for b in range(attention_mask.shape[0]):
        attended = [i for i in range(attention_mask.shape[1]) if attention_mask[b, i]]
        if not attended:
            continue
        bos = attended[0]
        tokens = [i for i in attended[1:] if token_mask is None or token_mask[b, i]]
        if not tokens:
            continue
        total = 0.0
        for layer in layer_ids:
            h_bos = hidden_states[layer][b, bos].double()
            for i in tokens:
                h = hidden_states[layer][b, i].double()
                total += float(h @ h_bos / (h.norm() * h_bos.norm())) ** 2
        per_sample.append(total / (len(tokens) * len(layer_ids)))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def random_hidden_states(num_layers=4, batch=4, length=9, dim=8, dtype=torch.float32):
    # A shared direction makes the cosines far from 0, as with real sinks.
    common = torch.randn(dim)
    return tuple((torch.randn(batch, length, dim) + 2 * common).to(dtype) for _ in range(num_layers + 1))


def padding_mask(lengths, length, side):
    positions = torch.arange(length)
    lengths = torch.tensor(lengths).unsqueeze(-1)
    return (positions >= length - lengths) if side == "left" else (positions < lengths)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layers,layer_ids", [("paper", [2, 3]), ("reference", [1, 2, 3]), ([0, 4], [0, 4])])
def test_decorrelation_matches_loop(side, layers, layer_ids):
    hidden = random_hidden_states()
    mask = padding_mask([9, 6, 1, 4], 9, side).long()  # the third sample is its BOS alone: no eligible token
    expected = loop_decorrelation(hidden, mask, None, layer_ids)
    torch.testing.assert_close(decorrelation_loss(hidden, mask, layers=layers).double(), torch.tensor(expected,
                               dtype=torch.float64), rtol=1e-5, atol=1e-6)

    token_mask = torch.rand(4, 9) > 0.4
    token_mask[1] = False  # the second sample loses all its tokens to the token mask
    expected = loop_decorrelation(hidden, mask, token_mask, layer_ids)
    got = decorrelation_loss(hidden, mask, token_mask=token_mask, layers=layers)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_decorrelation_paper_layers_are_two_to_l_minus_one():
    hidden = random_hidden_states(num_layers=6)
    mask = torch.ones(4, 9)
    torch.testing.assert_close(decorrelation_loss(hidden, mask), decorrelation_loss(hidden, mask, layers=[2, 3, 4, 5]))
    with pytest.raises(ValueError, match="selects no entry"):
        decorrelation_loss(random_hidden_states(num_layers=2), mask)
    with pytest.raises(ValueError):
        decorrelation_loss(hidden, mask, layers="first")


def test_decorrelation_dtype_zero_vectors_and_empty():
    hidden = random_hidden_states(dtype=torch.bfloat16)
    mask = torch.ones(4, 9, dtype=torch.long)
    loss = decorrelation_loss(hidden, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), torch.tensor(loop_decorrelation(hidden, mask, None, [2, 3]),
                               dtype=torch.float64), rtol=1e-5, atol=1e-6)

    zeros = tuple(torch.zeros(2, 5, 8, requires_grad=True) for _ in range(5))
    loss = decorrelation_loss(zeros, torch.ones(2, 5))
    loss.backward()
    assert loss == 0 and all(torch.isfinite(h.grad).all() for h in zeros[2:4])

    # No eligible token anywhere: 0, and backward still works (every process must take part in DDP's reduction).
    hidden = tuple(h.float().requires_grad_() for h in random_hidden_states())
    loss = decorrelation_loss(hidden, torch.ones(4, 9), token_mask=torch.zeros(4, 9, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and hidden[2].grad is not None


def build(modality="vsr", lora_b_std=0.1):
    tokenizer = tiny_tokenizer()
    config = tiny_config(modality, tokenizer=tokenizer)
    processor = tiny_processor(modality, config.audio_compression_rate, config.video_compression_rate, tokenizer)
    torch.manual_seed(0)
    model = LlamaAVSRForConditionalGeneration(config)
    # LoRA starts as the identity (B = 0), which would leave LoRA A without gradients: give B some weight so that
    # every trainable tensor is compared.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=lora_b_std)
    return model, processor


def test_decorrelation_on_model_ignores_padding():
    model, processor = build("vsr")
    model.eval()
    clips = random_clips(3, seed=3, seconds=(0.3, 0.8))
    with torch.no_grad():
        both = processor(videos=[v for _, v in clips], text=TARGETS[:3])
        batched = decorrelation_loss(model(**both, output_hidden_states=True).hidden_states, both["attention_mask"])
        alone = []
        for i, (_, video) in enumerate(clips):
            one = processor(videos=[video], text=[TARGETS[i]])
            alone.append(decorrelation_loss(model(**one, output_hidden_states=True).hidden_states,
                                            one["attention_mask"]))
    torch.testing.assert_close(batched, torch.stack(alone).mean(), rtol=1e-4, atol=1e-5)


# ---- metric, prompt rebuilding, arguments --------------------------------------------------------------------------


def test_word_error_rate_is_corpus_level():
    # 1 substitution + 1 insertion in 3 words, case ignored in 2 words, 2 deletions in 2 words: 4 edits / 7 words.
    predictions = ["the cat sit on", "A B", ""]
    references = ["the cat sat", "a b", "two words"]
    assert word_error_rate(predictions, references) == pytest.approx(4 / 7)
    assert word_error_rate(["x"], ["x"]) == 0.0
    with pytest.raises(ValueError):
        word_error_rate(["a"], ["a", "b"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_only_equals_processor_without_text(side):
    processor = tiny_processor("avsr")
    clips = random_clips(3, seed=4, seconds=(0.3, 1.0))
    audio, videos = [a for a, _ in clips], [v for _, v in clips]
    teacher_forced = processor(audio=audio, videos=videos, text=TARGETS[:3], padding_side=side)
    teacher_forced["logits_to_keep"] = 5
    expected = processor(audio=audio, videos=videos)
    got = prompt_only(teacher_forced, processor.tokenizer.pad_token_id)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_to_keep_is_added_on_the_host(side):
    processor = tiny_processor("vsr")
    clips = random_clips(3, seed=5, seconds=(0.3, 0.9))

    def collate(features):
        return dict(processor(videos=[v for _, v in clips], text=TARGETS[:3], padding_side=side))

    batch = LogitsToKeepCollator(collate)(None)
    if side == "left":  # the longest transcript + EOS, and the prompt token before it
        assert batch["logits_to_keep"] == int(batch["labels"].ne(-100).sum(-1).max()) + 1
    else:  # the transcripts do not all end the rows: every position needs its logits
        assert "logits_to_keep" not in batch


def test_training_arguments_defaults_and_checks(tmp_path):
    args = AVSRTrainingArguments(output_dir=str(tmp_path), report_to="none")
    assert args.decorrelation_weight == 0 and args.decorrelation_layers == "paper"
    assert args.decorrelation_tokens == "all" and args.generation_num_beams == 1
    assert args.generation_max_new_tokens == 32
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    with pytest.raises(ValueError):
        AVSRTrainingArguments(output_dir=str(tmp_path), report_to="none", decorrelation_tokens="transcript")


# ---- the Trainer ----------------------------------------------------------------------------------------------------


class Clips(torch.utils.data.Dataset):
    """Deterministic in-memory clips with their transcripts."""

    def __init__(self, n, seed=0, seconds=(0.3, 0.7)):
        self.clips = random_clips(n, seed, seconds)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        audio, video = self.clips[i]
        return {"audio": audio, "video": video, "text": TARGETS[i % len(TARGETS)]}


class ProcessorCollator:
    """The real collator is data/'s; this one just runs the processor on the batch (it left-pads)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, features):
        media = {"videos": [f["video"] for f in features]}
        if self.processor.uses_audio:
            media["audio"] = [f["audio"] for f in features]
        return dict(self.processor(**media, text=[f["text"] for f in features]))


class GradientCapture(TrainerCallback):
    """Gradients as the optimizer would see them (after accumulation and the DDP all-reduce)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StepCounter(TrainerCallback):
    def __init__(self):
        self.count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


def make_trainer(output_dir, train_dataset, eval_dataset=None, modality="vsr", callbacks=(), **overrides):
    model, processor = build(modality)
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1,
        learning_rate=2e-2, decorrelation_weight=10.0, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, max_grad_norm=0.0, seed=0, generation_max_new_tokens=6,
    )
    settings.update(overrides)
    return AVSRTrainer(
        model=model, args=AVSRTrainingArguments(**settings), train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=ProcessorCollator(processor), processing_class=processor, callbacks=list(callbacks),
    )


def captured_gradients(output_dir, **overrides):
    capture = GradientCapture()
    trainer = make_trainer(output_dir, Clips(4), Clips(4, seed=1), callbacks=[capture], **overrides)
    trainer.train()
    return capture.grads, trainer.state.log_history[0], trainer


def assert_same_gradients(got, expected):
    assert set(got) == set(expected)
    flat_got = torch.cat([got[n].flatten() for n in sorted(got)])
    flat_expected = torch.cat([expected[n].flatten() for n in sorted(expected)])
    assert flat_expected.norm() > 0
    relative = float((flat_got - flat_expected).norm() / flat_expected.norm())
    assert relative < 1e-5, relative


def test_gradient_accumulation_equivalence(tmp_path):
    # The 4 clips make one optimizer step either way; the decorrelation term (prefix tokens, as the original) must
    # be scaled like the CE, which Trainer normalises over the whole accumulation window.
    whole, whole_log, _ = captured_gradients(tmp_path / "a", per_device_train_batch_size=4,
                                             gradient_accumulation_steps=1, decorrelation_tokens="prefix")
    split, split_log, trainer = captured_gradients(tmp_path / "b", per_device_train_batch_size=2,
                                                   gradient_accumulation_steps=2, decorrelation_tokens="prefix")
    assert isinstance(trainer.data_collator, LogitsToKeepCollator)  # the LM head ran on the labelled ends only
    assert_same_gradients(split, whole)
    for key in ("loss", "ce_loss", "decor_loss"):
        assert split_log[key] == pytest.approx(whole_log[key], rel=1e-5), key
    assert whole_log["loss"] == pytest.approx(whole_log["ce_loss"] + 10.0 * whole_log["decor_loss"], rel=1e-5)


def test_logged_decorrelation_under_accumulation_when_the_loss_is_not_scaled(tmp_path):
    # A Trainer that does not pass num_items_in_batch (as for a model without loss kwargs) divides the returned loss
    # by the accumulation steps itself; the logged decor_loss must still be the step's mean, as with GA 1.
    logs = {}
    for batch, steps in ((4, 1), (2, 2)):
        trainer = make_trainer(tmp_path / str(steps), Clips(4), per_device_train_batch_size=batch,
                               gradient_accumulation_steps=steps, decorrelation_tokens="prefix")
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        logs[steps] = trainer.state.log_history[0]
    assert logs[2]["decor_loss"] == pytest.approx(logs[1]["decor_loss"], rel=1e-5)
    for log in logs.values():  # the micro-batches' CE means differ from the batch mean: compare each log with itself
        assert log["loss"] == pytest.approx(log["ce_loss"] + 10.0 * log["decor_loss"], rel=1e-5)


def distributed_worker(output_dir: str):
    """Run by each of two processes under torchrun: one optimizer step and an evaluation, batch 2 per process."""
    capture = GradientCapture()
    trainer = make_trainer(output_dir, Clips(4), Clips(4, seed=1), callbacks=[capture], ddp_backend="gloo")
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.args.process_index == 0:
        torch.save({"grads": capture.grads, "log": trainer.state.log_history[0], "metrics": metrics},
                   os.path.join(output_dir, "rank0.pt"))
    torch.distributed.barrier()  # rank 0's file is written before either process tears the group down
    trainer.accelerator.end_training()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nimport test_trainer\n"
                      f"test_trainer.distributed_worker({str(tmp_path)!r})\n"
                      # gloo's threads can abort the interpreter's teardown ("terminate called without an active
                      # exception", seen once in CI after the work was done): leave without running destructors.
                      "sys.stdout.flush(); sys.stderr.flush()\nimport os\nos._exit(0)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = torch.load(tmp_path / "rank0.pt")

    single, single_log, trainer = captured_gradients(tmp_path / "single", per_device_train_batch_size=4,
                                                     per_device_eval_batch_size=2)
    assert_same_gradients(distributed["grads"], single)
    for key in ("loss", "ce_loss", "decor_loss"):
        assert distributed["log"][key] == pytest.approx(single_log[key], rel=1e-5), key
    # Evaluation: the CE and decorrelation parts and the WER are gathered over both processes. Each evaluation
    # batch's CE is its own token mean, so one process evaluating the same batches (2 clips each) gives the same.
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_ce_loss", "eval_decor_loss", "eval_wer"):
        assert distributed["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key


@pytest.mark.parametrize("light", [True, False])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, light):
    # 20 steps saving at step 10, then a fresh trainer resumed from checkpoint-10 to step 20. 6 clips in batches of
    # 2: step 10 is inside an epoch, so the data order must be restored too.
    settings = dict(max_steps=20, save_strategy="steps", save_steps=10, learning_rate=1e-2, light_checkpoints=light)
    uninterrupted = make_trainer(tmp_path, Clips(6), **settings)
    uninterrupted.train()
    checkpoint = tmp_path / "checkpoint-10"
    assert (checkpoint / "adapter_model.safetensors").is_file() == light
    assert (checkpoint / "model.safetensors").is_file() == (not light)
    steps = StepCounter()
    resumed = make_trainer(tmp_path / "resumed", Clips(6), callbacks=[steps], **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert steps.count == 10  # it did start from the checkpoint, not from scratch

    for key in ("loss", "ce_loss", "decor_loss"):
        assert at_step(resumed, 20)[key] == pytest.approx(at_step(uninterrupted, 20)[key], rel=1e-5), key
    for (name, a), b in zip(uninterrupted.model.named_parameters(), resumed.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)

    losses = [log["loss"] for log in uninterrupted.state.log_history if "loss" in log]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses  # lambda = 10: the total loss falls


def at_step(trainer, step):
    return next(log for log in trainer.state.log_history if log["step"] == step and "loss" in log)


@pytest.fixture(scope="module")
def media_rows(tmp_path_factory):
    """Six clips on disk (16 kHz wav + 25 fps 96x96 mp4) of different lengths, as the loaders' rows."""
    import datasets
    import soundfile as sf

    from make_trees import write_face_mp4

    root = tmp_path_factory.mktemp("media")
    rows = {"id": [], "audio_path": [], "video_path": [], "text": [], "duration": []}
    for i, (audio, video) in enumerate(random_clips(6, seed=7, seconds=(0.3, 0.9))):
        stem = root / f"clip{i}"
        sf.write(stem.with_suffix(".wav"), audio[: len(video) * 640], 16000)
        write_face_mp4(stem.with_suffix(".mp4"), np.repeat(video[..., None], 3, axis=-1), None)
        for key, value in (("id", f"clip{i}"), ("audio_path", str(stem.with_suffix(".wav"))),
                           ("video_path", str(stem.with_suffix(".mp4"))), ("text", TARGETS[i]),
                           ("duration", len(video) / 25)):
            rows[key].append(value)
    return datasets.Dataset.from_dict(rows)


def augmenting_trainer(output_dir, rows, **overrides):
    """The training recipe's pieces: the data/ collator with babble noise, random crops and time masking, and the
    default group_by_length sampler over the clip durations."""
    from modeling_llama_avsr.data.collator import REFERENCE_SNRS_DB, AVSRDataCollator, NoiseSpec

    model, processor = build("avsr")
    collator = AVSRDataCollator(processor, train=True, train_noise=NoiseSpec("babble", REFERENCE_SNRS_DB),
                                babble_pool=list(rows["audio_path"]), seed=3)
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=8, learning_rate=2e-2,
        decorrelation_weight=0.0, report_to="none", save_strategy="steps", save_steps=4, logging_steps=1,
        disable_tqdm=True, use_cpu=True, max_grad_norm=0.0, seed=0, train_sampling_strategy="group_by_length",
        length_column_name="duration",
    )
    settings.update(overrides)
    return AVSRTrainer(model=model, args=AVSRTrainingArguments(**settings), train_dataset=rows,
                       data_collator=collator, processing_class=processor)


def test_resume_is_exact_with_group_by_length_and_babble(tmp_path, media_rows):
    # 6 clips in batches of 2: checkpoint-4 is the second step of epoch 1, so the resumed run must redraw epoch 1's
    # length-grouped order and every augmentation (SNR, babble talkers, crop, time mask) of steps 5-8 exactly.
    uninterrupted = augmenting_trainer(tmp_path, media_rows)
    uninterrupted.train()
    resumed = augmenting_trainer(tmp_path / "resumed", media_rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    expected = [at_step(uninterrupted, step)["loss"] for step in range(5, 9)]
    assert [at_step(resumed, step)["loss"] for step in range(5, 9)] == pytest.approx(expected, rel=1e-6)
    assert len(set(expected)) == 4
    # the trainer told the collator each epoch (steps 7-8 are epoch 2), so epochs are augmented differently
    assert uninterrupted.data_collator.collator.epoch == resumed.data_collator.collator.epoch == 2


def test_collator_augments_by_seed_epoch_and_utterance(media_rows):
    from modeling_llama_avsr.data.collator import AVSRDataCollator, NoiseSpec

    processor = tiny_processor("avsr")
    rows = [media_rows[i] for i in range(4)]

    def collate(batch, epoch=0, seed=0):
        collator = AVSRDataCollator(processor, train=True, train_noise=NoiseSpec("white", (0.0, 10.0)), seed=seed)
        collator.set_epoch(epoch)
        return collator(batch)

    whole = collate(rows)
    # the same utterance is augmented alike whatever batch it is in and whatever came before
    alone = collate([rows[2]])
    for key in ("input_features", "pixel_values_videos"):
        real = alone[key].shape[1] if key == "pixel_values_videos" else alone[key].shape[-1]
        got = whole[key][2, -real:] if key == "pixel_values_videos" else whole[key][2, ..., :real]
        torch.testing.assert_close(got, alone[key][0, -real:] if key == "pixel_values_videos" else alone[key][0])
    assert not torch.equal(collate(rows, epoch=1)["pixel_values_videos"], whole["pixel_values_videos"])
    assert not torch.equal(collate(rows, seed=1)["input_features"], whole["input_features"])


def test_length_grouped_order_is_a_function_of_seed_and_epoch():
    from trainer import EpochSeededLengthGroupedSampler

    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12]
    sampler = EpochSeededLengthGroupedSampler(4, lengths, seed=0)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG does not matter
    assert list(sampler) == first and sorted(first) == list(range(12))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(EpochSeededLengthGroupedSampler(4, lengths, seed=1)) != first


def test_small_checkpoints_hold_only_trained_tensors(tmp_path):
    from modeling_llama_avsr.modeling_llama_avsr import load_light_weights

    trainer = make_trainer(tmp_path, Clips(4), max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    saved = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json", "config.json"} <= saved and "model.safetensors" not in saved
    trainer.save_model(tmp_path / "final")  # the final save keeps every weight
    assert (tmp_path / "final" / "model.safetensors").is_file()
    # loading the checkpoint into the untrained model gives the trained one
    fresh, _ = build("vsr")
    load_light_weights(fresh, checkpoint)
    for (name, a), b in zip(trainer.model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_evaluation_during_training_keeps_the_best_wer(tmp_path):
    trainer = make_trainer(tmp_path, Clips(4), Clips(4, seed=1), max_steps=6, eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                           metric_for_best_model="wer", learning_rate=5e-2)
    assert trainer.args.greater_is_better is False
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_wer" in log]
    assert [log["step"] for log in evaluations] == [2, 4, 6]
    best = min(evaluations, key=lambda log: (log["eval_wer"], log["step"]))
    assert trainer.state.best_metric == best["eval_wer"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    # the model at the end is the best checkpoint's: evaluating it again gives that evaluation's numbers
    again = trainer.evaluate()
    assert again["eval_wer"] == best["eval_wer"]
    assert again["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-6)


def test_early_stopping_on_wer(tmp_path):
    # A threshold no change can pass: the second evaluation is not an improvement, so training stops there.
    trainer = make_trainer(tmp_path, Clips(4), Clips(4, seed=1), max_steps=20, eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                           metric_for_best_model="wer", early_stopping_patience=1, early_stopping_threshold=1e9)
    trainer.train()
    assert trainer.state.global_step == 4
    with pytest.raises(ValueError, match="--early_stopping_patience needs evaluation during training"):
        AVSRTrainingArguments(output_dir=str(tmp_path), report_to="none", early_stopping_patience=2)


def test_train_logs_and_evaluate_reports_wer(tmp_path):
    runs = {}
    for weight in (0.0, 1e3):
        trainer = make_trainer(tmp_path / str(weight), Clips(4), Clips(4, seed=1), decorrelation_weight=weight,
                               max_steps=8, learning_rate=5e-2)
        trainer.train()
        runs[weight] = trainer.evaluate(), trainer.state.log_history

    metrics, logs = runs[1e3]
    train_logs = [log for log in logs if "loss" in log]
    assert all("ce_loss" in log and "decor_loss" in log for log in train_logs)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    for key in ("eval_loss", "eval_wer", "eval_ce_loss", "eval_decor_loss"):
        assert key in metrics, metrics
    assert metrics["eval_wer"] >= 0
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_ce_loss"] + 1e3 * metrics["eval_decor_loss"], rel=1e-4)

    baseline, baseline_logs = runs[0.0]
    assert all("decor_loss" not in log for log in baseline_logs if "loss" in log)  # lambda = 0: not computed
    assert baseline["eval_loss"] == pytest.approx(baseline["eval_ce_loss"], rel=1e-5)
    assert metrics["eval_decor_loss"] < 0.5 * baseline["eval_decor_loss"], (metrics, baseline)


def test_max_frames_batches_through_trainer(tmp_path):
    # The max-frames path builds its own DataLoader over the dataset's `num_frames` column.
    import datasets

    clips = Clips(6, seconds=(0.3, 1.2))
    frames = [len(video) for _, video in clips.clips]
    table = datasets.Dataset.from_dict({"index": list(range(6)), "num_frames": frames})
    trainer = make_trainer(tmp_path, table, max_frames_per_batch=48, max_steps=-1, num_train_epochs=1)
    inner, batches = trainer.data_collator, []

    def collate(rows):
        batches.append([row["index"] for row in rows])
        return inner([clips[row["index"]] for row in rows])

    trainer.data_collator = collate
    trainer.train()
    assert sorted(i for batch in batches for i in batch) == list(range(6))  # every clip once in the epoch
    for batch in batches:  # padded frames (lengths rounded up to 5) within the budget, or a clip on its own
        assert len(batch) == 1 or len(batch) * -(-max(frames[i] for i in batch) // 5) * 5 <= 48, batch
    assert len(batches) > 1 and trainer.state.global_step == len(batches)
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


class PoisonAtStep(TrainerCallback):
    """Makes one LoRA weight NaN before optimizer step `step` runs, as a diverged bf16 step would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_training_stops_at_the_first_non_finite_log_and_saves_nothing_after_it(tmp_path):
    trainer = make_trainer(tmp_path, Clips(8), callbacks=[PoisonAtStep(2)], max_steps=4, max_grad_norm=1.0,
                           save_strategy="steps", save_steps=1)
    with pytest.raises(FloatingPointError, match=r"training diverged by step 2: ce_loss = nan.*grad_norm = nan"
                                                 r".*weights in float32.*--dtype float32"):
        trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    finite = trainer.state.log_history[0]
    assert finite["step"] == 1 and np.isfinite(finite["ce_loss"]) and np.isfinite(finite["grad_norm"])


def test_half_precision_padding_warning_only_for_half_weights_on_cuda_with_padding():
    from trainer.avsr_trainer import half_precision_padding_warning

    message = half_precision_padding_warning(torch.bfloat16, "cuda", 16)
    assert "pad_to_multiple_of=16" in message and "bfloat16" in message and "--dtype float32" in message
    assert "float16 weights" in half_precision_padding_warning(torch.float16, "cuda", 32)
    # float32, the CPU, or no padding: the combinations that trained normally get no warning.
    assert half_precision_padding_warning(torch.float32, "cuda", 16) is None
    assert half_precision_padding_warning(torch.bfloat16, "cpu", 16) is None
    assert half_precision_padding_warning(torch.bfloat16, "cuda", None) is None
