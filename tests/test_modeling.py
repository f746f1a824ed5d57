import pytest
import torch

from modeling_llama_avsr import LlamaAVSRConfig, LlamaAVSRForConditionalGeneration
from modeling_llama_avsr.modeling_llama_avsr import compress

from remote_code import remote_logits_match
from tiny import random_clips, tiny_config, tiny_processor, tiny_tokenizer

MODES = [("asr", "avg"), ("vsr", "avg"), ("avsr", "avg"), ("asr", "stack"), ("vsr", "stack"), ("avsr", "stack")]
TARGETS = ["place blue at f two now", "red green by one", "place red in three now", "blue at two"]


def build(modality, kind="avg", **kwargs):
    tokenizer = tiny_tokenizer()
    config = tiny_config(modality, kind, tokenizer=tokenizer, **kwargs)
    processor = tiny_processor(modality, config.audio_compression_rate, config.video_compression_rate, tokenizer)
    return LlamaAVSRForConditionalGeneration(config), processor


def batch(processor, n, text=True, seed=0):
    clips = random_clips(n, seed)
    audio, videos = [a for a, _ in clips], [v for _, v in clips]
    return processor(audio=audio, videos=videos, text=TARGETS[:n] if text else None)


def test_compress_matches_loop():
    frames = torch.randn(2, 11, 3)
    valid = torch.arange(11) < torch.tensor([[11], [6]])
    avg, avg_mask = compress(frames, valid, 4, "avg")
    stack, _ = compress(frames, valid, 4, "stack")
    for b, length in enumerate([11, 6]):
        for w in range((length + 3) // 4):
            window = frames[b, 4 * w : min(4 * w + 4, length)]
            torch.testing.assert_close(avg[b, w], window.mean(0))
            padded = torch.cat([window, torch.zeros(4 - len(window), 3)]).flatten()
            torch.testing.assert_close(stack[b, w], padded)
        assert avg_mask[b].sum() == (length + 3) // 4


@pytest.mark.parametrize("modality,kind", MODES)
def test_loss_falls(modality, kind):
    model, processor = build(modality, kind)
    inputs = batch(processor, 3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("modality,kind", MODES)
def test_batched_generation_equals_single(modality, kind):
    model, processor = build(modality, kind)
    model.eval()
    clips = random_clips(3, seed=1, seconds=(0.4, 1.6))
    pad = processor.tokenizer.pad_token_id
    together = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips])
    out = model.generate(**together, max_new_tokens=6, do_sample=False, pad_token_id=pad, min_new_tokens=6)
    new = out[:, together["input_ids"].shape[1] :]
    for i, (audio, video) in enumerate(clips):
        alone = processor(audio=[audio], videos=[video])
        single = model.generate(**alone, max_new_tokens=6, do_sample=False, pad_token_id=pad, min_new_tokens=6)
        assert single[0, alone["input_ids"].shape[1] :].tolist() == new[i].tolist()


def test_beam_search_runs_batched():
    model, processor = build("avsr")
    model.eval()
    inputs = batch(processor, 2, text=False)
    pad = processor.tokenizer.pad_token_id
    out = model.generate(**inputs, num_beams=3, max_new_tokens=4, min_new_tokens=4, pad_token_id=pad)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_left_padding_does_not_change_logits():
    model, processor = build("avsr")
    model.eval()
    clips = random_clips(2, seed=2, seconds=(0.5, 1.5))
    both = processor(audio=[a for a, _ in clips], videos=[v for _, v in clips], text=TARGETS[:2])
    with torch.no_grad():
        logits = model(**both).logits
        for i, (audio, video) in enumerate(clips):
            alone = processor(audio=[audio], videos=[video], text=[TARGETS[i]])
            n = alone["input_ids"].shape[1]
            torch.testing.assert_close(model(**alone).logits[0], logits[i, -n:], atol=1e-4, rtol=1e-4)


def test_frozen_parts_and_lora_scope():
    model, _ = build("avsr")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "_projector." in n for n in trainable)
    lora = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert all(n.startswith("model.language_model.") and n.endswith(("q_proj", "v_proj")) for n in lora)
    assert len(lora) == 2 * model.config.text_config.num_hidden_layers
    assert not model.model.audio_encoder.training and not model.model.video_encoder.training
    assert model.model.language_model.training


def test_lora_starts_as_identity():
    config = tiny_config("asr")
    torch.manual_seed(0)
    with_lora = LlamaAVSRForConditionalGeneration(config)
    b_norm = sum(p.abs().sum() for n, p in with_lora.named_parameters() if "lora_B" in n)
    assert b_norm == 0


def test_placeholder_mismatch_is_a_clear_error():
    model, processor = build("asr")
    inputs = batch(processor, 2)
    inputs["input_ids"][0, inputs["input_ids"][0] == model.config.audio_token_id] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="audio placeholders and audio features do not match"):
        model(**inputs)


def test_logits_to_keep_gives_same_loss():
    model, processor = build("avsr")
    model.eval()
    inputs = batch(processor, 3)
    keep = int((inputs["labels"] != -100).sum(-1).max()) + 1
    with torch.no_grad():
        full = model(**inputs).loss
        kept = model(**inputs, logits_to_keep=keep)
    torch.testing.assert_close(full, kept.loss)
    assert kept.logits.shape[1] == keep


def test_num_items_in_batch_is_honoured():
    model, processor = build("asr")
    inputs = batch(processor, 2)
    n = int((inputs["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = model(**inputs).loss
        summed = model(**inputs, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean / 2)


def test_save_load_round_trip(tmp_path):
    model, processor = build("avsr")
    model.eval()
    inputs = batch(processor, 2)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_config_round_trip(tmp_path):
    from transformers import AutoConfig

    config = tiny_config("vsr", "stack", audio_rate=3, video_rate=5, projector_layer_norm=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LlamaAVSRConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.audio_config is None and loaded.video_config.hidden_size == 16
    assert loaded.prompt == "Transcribe video to text."


def test_trust_remote_code_without_the_package(tmp_path):
    """A process where `modeling_llama_avsr` cannot be imported still loads the saved folder."""
    model, processor = build("avsr")
    model.eval()
    inputs = batch(processor, 1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**inputs).logits
    check = "assert type(processor).__name__ == 'LlamaAVSRProcessor'"
    result = remote_logits_match(tmp_path, inputs, expected, check)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_whisper_subclass_equals_transformers_encoder_on_full_window():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = tiny_config("asr").audio_config
    ours = LlamaAVSRForConditionalGeneration(tiny_config("asr")).model.audio_encoder.eval()
    reference = WhisperEncoder(config).eval()
    reference.load_state_dict(ours.state_dict())
    features = torch.randn(2, 80, 3000)
    with torch.no_grad():
        torch.testing.assert_close(ours(features).last_hidden_state, reference(features).last_hidden_state)
        short = ours(features[:, :, :400]).last_hidden_state
    assert short.shape == (2, 200, config.d_model)


def test_trimmed_audio_window_trains_and_generates():
    model, processor = build("asr")
    processor.audio_window = "trimmed"
    inputs = batch(processor, 2)
    assert inputs["input_features"].shape[-1] < 3000
    loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)


# ---- partial last window: kept (ceil) or dropped as the original's AvgPool1d (floor) -----------------------------


def test_dropped_partial_window_matches_avg_pool1d():
    frames = torch.randn(3, 11, 5)
    lengths = [11, 6, 8]  # partial last windows of 3 and 2 frames, and none
    valid = torch.arange(11) < torch.tensor(lengths).unsqueeze(-1)
    avg, avg_mask = compress(frames, valid, 4, "avg", "drop")
    stack, stack_mask = compress(frames, valid, 4, "stack", "drop")
    for b, length in enumerate(lengths):
        # The original's rule on this sample's real frames alone: AvgPool1d(K) over time, floor(T / K) tokens.
        expected = torch.nn.AvgPool1d(4)(frames[b, :length].T.unsqueeze(0))[0].T
        n = expected.shape[0]
        assert n == length // 4 and avg_mask[b].sum() == n and stack_mask[b].sum() == n
        assert avg_mask[b, :n].all() and stack_mask[b, :n].all()
        torch.testing.assert_close(avg[b, :n], expected)
        torch.testing.assert_close(stack[b, :n], frames[b, : 4 * n].reshape(n, 4 * 5))


@pytest.mark.parametrize("kind", ["avg", "stack"])
def test_partial_window_drop_model_equals_avg_pool1d_of_encoder_frames(kind):
    tokenizer = tiny_tokenizer()
    config = tiny_config("asr", kind, audio_rate=4, tokenizer=tokenizer, partial_window="drop")
    model = LlamaAVSRForConditionalGeneration(config).eval()
    processor = tiny_processor("asr", 4, 2, tokenizer, partial_window="drop")
    # 0.7 s -> 35 encoder frames (a partial window of 3), 0.96 s -> 48 (none), 1.1 s -> 55 (a partial window of 3).
    audio = [(0.1 * torch.randn(n)).numpy() for n in (11200, 15360, 17600)]
    inputs = processor(audio=audio, text=TARGETS[:3])
    placeholders = (inputs["input_ids"] == config.audio_token_id).sum(-1).tolist()
    assert placeholders == [35 // 4, 48 // 4, 55 // 4]
    with torch.no_grad():
        features, mask = model.get_audio_features(inputs["input_features"], inputs["feature_attention_mask"])
        assert mask.sum(-1).tolist() == placeholders
        assert torch.isfinite(model(**inputs).loss)
        for b, n in enumerate(placeholders):
            frames = model.model.audio_encoder(inputs["input_features"][b : b + 1]).last_hidden_state[0, : 4 * n]
            if kind == "avg":
                tokens = torch.nn.AvgPool1d(4)(frames.T.unsqueeze(0))[0].T
            else:
                tokens = frames.reshape(n, -1)
            torch.testing.assert_close(features[b, :n], model.model.audio_projector(tokens), atol=1e-5, rtol=1e-5)


def test_partial_window_processor_and_model_must_agree():
    tokenizer = tiny_tokenizer()
    model = LlamaAVSRForConditionalGeneration(tiny_config("vsr", tokenizer=tokenizer, partial_window="drop"))
    processor = tiny_processor("vsr", 4, 2, tokenizer)  # keeps the partial window: one placeholder too many
    video = random_clips(1, seconds=(0.6, 0.6))[0][1]  # 15 frames at rate 2
    with pytest.raises(ValueError, match="video placeholders and video features do not match"):
        model(**processor(videos=[video], text=TARGETS[:1]))
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match="partial_window"):
        tiny_config("vsr", partial_window="floor")


# ---- added-token rows -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory):
    """Tiny pretrained causal LMs, tied and untied, saved as from_components reads them (256-d: random rows are
    then nearly orthogonal)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = {}
    for tied in (True, False):
        folder = tmp_path_factory.mktemp(f"llm_tied_{tied}")
        tokenizer = tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                             initializer_range=0.05, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[tied] = str(folder)
    return folders


def compose_vsr(text_model, seed, **kwargs):
    from transformers import set_seed

    set_seed(seed)
    video = tiny_config("vsr").video_config
    return LlamaAVSRForConditionalGeneration.from_components(
        text_model=text_model, video_encoder=video, modality="vsr", projector_hidden_size=8, lora_rank=0, **kwargs
    )


def added_rows(model, weight):
    vocab = model.config.base_components["text_vocab_size"]
    return weight.detach()[vocab:], weight.detach()[:vocab]


@pytest.mark.parametrize("tied", [True, False])
def test_added_token_rows_are_independent_draws_of_the_llm_init(tiny_llms, tied):
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_llms[tied])
    model = compose_vsr(tiny_llms[tied], seed=1)
    assert model.config.added_tokens_init == "random"
    weights = [model.get_input_embeddings().weight]
    base_weights = [base.get_input_embeddings().weight]
    if not tied:
        weights.append(model.lm_head.weight)
        base_weights.append(base.lm_head.weight)
    for weight, base_weight in zip(weights, base_weights):
        new, old = added_rows(model, weight)
        torch.testing.assert_close(old, base_weight.detach())
        assert new.shape[0] == 6  # 4 markers, 2 placeholders
        unit = torch.nn.functional.normalize(new, dim=-1)
        cosines = (unit @ unit.T)[~torch.eye(len(new), dtype=torch.bool)]
        assert cosines.abs().max() < 0.3, cosines  # 256-d independent draws: |cos| ~ 1/16
        assert new.mean().abs() < 0.01 and new.std() == pytest.approx(0.05, rel=0.1)  # N(0, initializer_range^2)
    if not tied:  # the LM head's rows are drawn on their own, not copied from the embedding's
        assert not torch.allclose(added_rows(model, weights[0])[0], added_rows(model, weights[1])[0])
    # Seeded: set_seed gives the same rows again, another seed other rows.
    again = compose_vsr(tiny_llms[tied], seed=1).get_input_embeddings().weight
    other = compose_vsr(tiny_llms[tied], seed=2).get_input_embeddings().weight
    torch.testing.assert_close(again, weights[0])
    assert not torch.allclose(added_rows(model, other)[0], added_rows(model, weights[0])[0])


def test_added_token_rows_mean_option_is_transformers_mean_resizing(tiny_llms):
    model = compose_vsr(tiny_llms[True], seed=1, added_tokens_init="mean")
    assert model.config.added_tokens_init == "mean"
    new, old = added_rows(model, model.get_input_embeddings().weight)
    # Mean resizing samples N(mean, 1e-9 * covariance): every row is the mean embedding to ~1e-5.
    torch.testing.assert_close(new, old.mean(0, keepdim=True).expand_as(new), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="added_tokens_init"):
        compose_vsr(tiny_llms[True], seed=1, added_tokens_init="zeros")
