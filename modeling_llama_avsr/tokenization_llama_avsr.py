"""The LLM tokenizer, readied for Llama-AVSR: the markers and placeholders added, BOS and pad guaranteed.

Both `LlamaAVSRForConditionalGeneration.from_components` (which grows the vocabulary by the same tokens and stores
their ids in the config) and `LlamaAVSRProcessor` (which writes them into every sequence) need this, so it lives
below both of them.
"""

from transformers import AutoTokenizer

from .configuration_llama_avsr import (
    ADDED_TOKENS,
    AUDIO_END,
    AUDIO_PLACEHOLDER,
    AUDIO_START,
    VIDEO_END,
    VIDEO_PLACEHOLDER,
    VIDEO_START,
    resolve_component,
)

TOKEN_ID_NAMES = {
    AUDIO_START: "audio_start_token_id",
    AUDIO_END: "audio_end_token_id",
    VIDEO_START: "video_start_token_id",
    VIDEO_END: "video_end_token_id",
    AUDIO_PLACEHOLDER: "audio_token_id",
    VIDEO_PLACEHOLDER: "video_token_id",
}


def prepare_tokenizer(tokenizer) -> dict[str, int]:
    """Add the markers and placeholders (once) and make sure BOS and pad exist. Returns the config's token ids."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS)}, replace_extra_special_tokens=False)
    if tokenizer.bos_token is None:  # some LLMs have none; the sequence layout needs one
        tokenizer.add_special_tokens({"bos_token": "<|bos|>"})
    if tokenizer.pad_token is None:  # padding is masked, so reusing EOS is safe
        tokenizer.pad_token = tokenizer.eos_token
    return {name: tokenizer.convert_tokens_to_ids(token) for token, name in TOKEN_ID_NAMES.items()}


def load_component_tokenizer(text_model: str):
    """The tokenizer of `text_model` (Hub id, folder or offline name), prepared; and the config's token ids."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_component(text_model))
    token_ids = prepare_tokenizer(tokenizer)
    return tokenizer, token_ids


__all__ = ["TOKEN_ID_NAMES", "load_component_tokenizer", "prepare_tokenizer"]
