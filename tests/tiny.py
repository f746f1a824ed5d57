"""Tiny random configs of the real classes, and a tiny word-level tokenizer, shared by the fast tests."""

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor

from modeling_llama_avsr import AVHubertConfig, LlamaAVSRConfig, LlamaAVSRProcessor
from modeling_llama_avsr.tokenization_llama_avsr import prepare_tokenizer

WORDS = "transcribe speech and video to text . place blue at f two now red green by in one three".split()


def tiny_tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return tokenizer


def tiny_processor(modality="avsr", audio_rate=4, video_rate=2, tokenizer=None, **kwargs):
    tokenizer = tokenizer or tiny_tokenizer()
    return LlamaAVSRProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer,
        modality=modality,
        prompt="transcribe speech to text .",
        audio_compression_rate=audio_rate,
        video_compression_rate=video_rate,
        **kwargs,
    )


def tiny_config(modality="avsr", compression_type="avg", audio_rate=4, video_rate=2, tokenizer=None, **kwargs):
    tokenizer = tokenizer or tiny_tokenizer()
    token_ids = prepare_tokenizer(tokenizer)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    audio = WhisperConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=80)
    video = AVHubertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_pos=8,
        conv_pos_groups=2, resnet_frontend_channels=4, resnet_channels=[4, 4, 8, 8], audio_feat_dim=8,
    )
    return LlamaAVSRConfig(
        text_config=text, audio_config=audio, video_config=video, modality=modality,
        compression_type=compression_type, audio_compression_rate=audio_rate, video_compression_rate=video_rate,
        projector_hidden_size=24, lora_rank=4, lora_alpha=8, **token_ids, **kwargs,
    )


def random_clips(n, seed=0, seconds=(0.6, 1.4)):
    """n (audio 16 kHz, lip video 25 fps (T, 96, 96) uint8) pairs of matching random lengths."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        duration = rng.uniform(*seconds)
        audio = (0.1 * rng.standard_normal(int(duration * 16000))).astype(np.float32)
        video = rng.integers(0, 256, size=(int(duration * 25), 96, 96), dtype=np.uint8)
        clips.append((audio, video))
    return clips
