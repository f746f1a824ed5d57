"""A clip's encoder output, tokens and transcript do not depend on what else is in its batch, for every audio window.

The trimmed window pads log-mel only to the batch's longest clip; before the Whisper encoder masked its padded frames,
a short clip's features changed with its batch partners (and with them the transcript)."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import pipeline

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration

from tiny import tiny_config, tiny_processor, tiny_tokenizer

GENERATE = dict(max_new_tokens=6, min_new_tokens=6)
# Lengths that give odd and even numbers of log-mel frames, from a tenth of a second to 2.5 s.
SECONDS = (0.1, 2.5, 0.73, 1.3, 0.41)


def clips(seed=0):
    rng = np.random.default_rng(seed)
    audio = [(0.1 * rng.standard_normal(int(s * 16000) + i)).astype(np.float32) for i, s in enumerate(SECONDS)]
    video = [rng.integers(0, 256, size=(max(1, int(len(a) / 640)), 96, 96), dtype=np.uint8) for a in audio]
    return audio, video


def build(modality, window):
    tokenizer = tiny_tokenizer()
    model = LlamaAVSRForConditionalGeneration(tiny_config(modality, tokenizer=tokenizer)).eval()
    processor = tiny_processor(modality, tokenizer=tokenizer)
    processor.audio_window = window
    return model, processor


@pytest.mark.parametrize("window", ["trimmed", "full"])
@pytest.mark.parametrize("modality", ["asr", "avsr"])
def test_mixed_batch_equals_batch_of_one(modality, window):
    model, processor = build(modality, window)
    audio, video = clips()
    videos = video if modality == "avsr" else None
    batch = processor(audio=audio, videos=videos)
    with torch.no_grad():
        features, mask = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        generated = model.generate(**batch, **GENERATE)
    new = generated[:, batch["input_ids"].shape[1] :]
    for i in range(len(audio)):
        alone = processor(audio=[audio[i]], videos=None if videos is None else [video[i]])
        with torch.no_grad():
            features_1, mask_1 = model.get_audio_features(alone["input_features"], alone["feature_attention_mask"])
            generated_1 = model.generate(**alone, **GENERATE)
        n = int(mask_1.sum())
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(features[i, :n], features_1[0, :n], atol=1e-5, rtol=1e-5)
        assert new[i].tolist() == generated_1[0, alone["input_ids"].shape[1] :].tolist(), i


def test_pipeline_transcripts_do_not_depend_on_batch_size():
    model, processor = build("asr", "trimmed")
    audio, _ = clips(seed=1)
    pipe = pipeline("audio-visual-speech-recognition", model=model, processor=processor, **GENERATE)
    assert pipe(audio, batch_size=1) == pipe(audio, batch_size=4) == pipe(audio[::-1], batch_size=5)[::-1]


def test_full_window_runs_whisper_as_pretrained():
    # The 30-s window attends its padding, as Whisper was pretrained and as the reference runs it.
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model, processor = build("asr", "full")
    encoder = model.model.audio_encoder
    stock = WhisperEncoder(encoder.config).eval()
    stock.load_state_dict(encoder.state_dict())
    batch = processor(audio=clips()[0])
    with torch.no_grad():
        ours = encoder(batch["input_features"], attention_mask=batch["feature_attention_mask"]).last_hidden_state
        torch.testing.assert_close(ours, stock(batch["input_features"]).last_hidden_state, atol=1e-6, rtol=1e-6)


def test_a_30_s_clip_does_not_switch_its_trimmed_batch_to_the_full_window():
    # Trimmed batches stop short of 3000 log-mel frames, which the encoder would take as the full window.
    model, processor = build("asr", "trimmed")
    audio = [noise for noise in (0.1 * np.random.default_rng(3).standard_normal((2, 30 * 16000))).astype(np.float32)]
    audio[1] = audio[1][:16000]
    batch = processor(audio=audio)
    assert batch["input_features"].shape[-1] == 2998 and batch["feature_attention_mask"][0].sum() == 2998
    alone = processor(audio=[audio[1]])
    with torch.no_grad():
        features, mask = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        features_1, mask_1 = model.get_audio_features(alone["input_features"], alone["feature_attention_mask"])
    n = int(mask_1.sum())
    torch.testing.assert_close(features[1, :n], features_1[0, :n], atol=1e-5, rtol=1e-5)


class _HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (.item(), bool(tensor)) or a
    data-dependent shape (nonzero, masked_select)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_masked_encoder_never_waits_for_the_device():
    model, processor = build("asr", "trimmed")
    model.train()  # as in a training step
    audio, _ = clips()
    batch = processor(audio=audio, text=["place blue"] * len(audio))
    with _HostSyncs() as syncs:
        features, mask = model.get_audio_features(batch["input_features"], batch["feature_attention_mask"])
        features.sum().backward()
    assert syncs.seen == []
    assert mask.sum() > 0


@pytest.mark.slow
def test_real_whisper_features_do_not_depend_on_the_batch(offline_cache_dir):
    # Whisper tiny.en's real weights on synthesised speech of different lengths, as the main job encodes them.
    pytest.importorskip("espeakng_loader")
    from transformers import WhisperFeatureExtractor, WhisperModel

    from modeling_llama_avsr.configuration_llama_avsr import resolve_component, whisper_trimmed_frames
    from modeling_llama_avsr.data.tts import synthesize
    from modeling_llama_avsr.modeling_llama_avsr import LlamaAVSRWhisperEncoder

    path = resolve_component("whisper-tiny.en")
    whisper = WhisperModel.from_pretrained(path)
    encoder = LlamaAVSRWhisperEncoder(whisper.config).eval()
    encoder.load_state_dict(whisper.encoder.state_dict())
    extractor = WhisperFeatureExtractor.from_pretrained(path)
    speech = [synthesize(text).audio for text in ("bin blue at f two now", "a green boat", "set red by g nine soon")]

    def encode(audio):
        window = whisper_trimmed_frames(-(-max(len(a) for a in audio) // 160)) * 160  # the processor's trimmed window
        features = extractor(audio, sampling_rate=16000, return_attention_mask=True, padding="max_length",
                             max_length=window, return_tensors="pt")
        with torch.no_grad():
            out = encoder(features["input_features"], attention_mask=features["attention_mask"]).last_hidden_state
        return out, (features["attention_mask"].sum(-1) + 1) // 2

    together, lengths = encode(speech)
    for i, audio in enumerate(speech):
        alone, _ = encode([audio])
        n = int(lengths[i])
        # float32 rounding of differently sized matmuls only: 1e-5 of the largest feature
        scale = alone[0, :n].abs().max()
        torch.testing.assert_close(together[i, :n] / scale, alone[0, :n] / scale, atol=1e-5, rtol=0)
