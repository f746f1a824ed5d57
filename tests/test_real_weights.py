"""The foundation on the real offline weights: SmolLM2-135M + Whisper tiny.en composed into an ASR model."""

import pytest
import torch

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRProcessor
from remote_code import remote_logits_match

pytestmark = pytest.mark.slow

SENTENCES = ["place blue at f two now", "the cat sat on the warm mat", "bin red by g nine again"]
COMPONENTS = dict(text_model="smollm2-135m", audio_encoder="whisper-tiny.en", modality="asr")


@pytest.fixture(scope="module")
def speech():
    from modeling_llama_avsr.data.tts import synthesize

    return [synthesize(text, rate=160).audio for text in SENTENCES]


@pytest.fixture(scope="module")
def asr(offline_cache_dir):
    model = LlamaAVSRForConditionalGeneration.from_components(**COMPONENTS)
    processor = LlamaAVSRProcessor.from_components(**COMPONENTS)
    return model, processor


def test_sequence_starts_with_bos_and_parts_are_frozen(asr, speech):
    model, processor = asr
    inputs = processor(audio=speech, text=SENTENCES)
    first = inputs["attention_mask"].argmax(-1)
    assert (inputs["input_ids"].gather(1, first[:, None]) == processor.tokenizer.bos_token_id).all()
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer.bos_token_id) == "<|im_start|>"
    model.train()
    assert not model.model.audio_encoder.training
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.startswith("model.audio_encoder.") for n in frozen)
    assert model.model.language_model.embed_tokens.weight.requires_grad is False
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "audio_projector." in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 2 * 30  # q_proj and v_proj of all 30 layers
    model.eval()


def test_loss_falls_on_real_speech(asr, speech):
    model, processor = asr
    inputs = processor(audio=speech, text=SENTENCES)
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():  # leave the shared model as it was for the other tests
        for p, s in zip(trainable, saved):
            p.copy_(s)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_batched_greedy_equals_single(asr, speech):
    model, processor = asr
    batch = processor(audio=speech)
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=12, do_sample=False)
    new = together[:, batch["input_ids"].shape[1]:]
    for i, audio in enumerate(speech):
        alone = processor(audio=[audio])
        with torch.no_grad():
            single = model.generate(**alone, max_new_tokens=12, do_sample=False)
        single_new = single[0, alone["input_ids"].shape[1]:].tolist()
        assert single_new == new[i, : len(single_new)].tolist()


def test_save_load_and_remote_code(asr, speech, tmp_path):
    model, processor = asr
    inputs = processor(audio=speech[:2], text=SENTENCES[:2])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**inputs).logits
    loaded = LlamaAVSRForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
    check = "assert processor.tokenizer.bos_token == '<|im_start|>'"
    result = remote_logits_match(tmp_path, inputs, expected, check)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
