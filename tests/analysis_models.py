"""The tiny random LlamaAVSR (audio + video) and batch that the analysis tests share (test_analysis*.py)."""

import torch

from modeling_llama_avsr import LlamaAVSRForConditionalGeneration
from modeling_llama_avsr.analysis import decoder_of

from tiny import random_clips, tiny_config, tiny_processor, tiny_tokenizer

TARGETS = ["place blue at f two now", "red green by one", "place red in three now"]


def clips():
    return random_clips(3, seed=3, seconds=(0.5, 1.5))


def tiny_avsr():
    """(model, processor, training batch with labels, fast inputs): `fast` feeds the decoder the merged embeddings
    directly (the encoders dominate the tiny model's time) with the batch's attention mask."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    config = tiny_config("avsr", tokenizer=tokenizer)
    processor = tiny_processor("avsr", config.audio_compression_rate, config.video_compression_rate, tokenizer)
    model = LlamaAVSRForConditionalGeneration(config).eval()
    pairs = clips()
    batch = processor(audio=[a for a, _ in pairs], videos=[v for _, v in pairs], text=TARGETS)
    seen = {}
    hook = decoder_of(model).register_forward_pre_hook(lambda m, a, k: seen.update(k) and None, with_kwargs=True)
    with torch.no_grad():
        model(**without_labels(batch))
    hook.remove()
    fast = {"inputs_embeds": seen["inputs_embeds"], "attention_mask": batch["attention_mask"]}
    return model, processor, batch, fast


def without_labels(batch):
    return {k: v for k, v in batch.items() if k != "labels"}
