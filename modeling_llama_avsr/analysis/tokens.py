"""Token-type labels for LlamaAVSR inputs: `[BOS] <audio> A.. </audio> <video> V.. </video> prompt transcript [EOS]`.

The paper finds intermediate sinks on low-semantic tokens (the markers, the prompt), so every figure and report says
which type each position is.
"""

import torch

PAD, BOS, AUDIO_MARKER, AUDIO, VIDEO_MARKER, VIDEO, PROMPT, TRANSCRIPT = range(8)
TOKEN_TYPE_NAMES = ("pad", "BOS", "audio marker", "audio", "video marker", "video", "prompt", "transcript")


def token_types(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, token_ids: dict,
                labels: torch.Tensor | None = None, prompt_length: int | None = None) -> torch.Tensor:
    """(B, N) type codes (see TOKEN_TYPE_NAMES) for a batch built by LlamaAVSRProcessor.

    token_ids: the processor's `token_ids` (marker and placeholder ids). Text after the last marker is the prompt, then
    the transcript: where `labels` are given, the transcript is where they are not -100; otherwise the first
    `prompt_length` text tokens are the prompt (all of them when None). A plain text input is BOS + prompt."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    types = torch.full_like(input_ids, PROMPT)
    for name, kind in (("audio_start_token_id", AUDIO_MARKER), ("audio_end_token_id", AUDIO_MARKER),
                       ("video_start_token_id", VIDEO_MARKER), ("video_end_token_id", VIDEO_MARKER),
                       ("audio_token_id", AUDIO), ("video_token_id", VIDEO)):
        if token_ids.get(name) is not None:
            types[input_ids == token_ids[name]] = kind
    # Text positions: index among the text tokens that follow BOS and the modality blocks.
    media = (types != PROMPT) & valid
    after_media = media.long().flip(-1).cumsum(-1).flip(-1) == 0  # no marker/placeholder at or after this position
    is_text = after_media & valid
    bos = valid.long().argmax(-1)
    is_text[torch.arange(len(bos)), bos] = False
    if labels is not None:
        types[is_text & (labels != -100)] = TRANSCRIPT
    elif prompt_length is not None:
        text_index = is_text.long().cumsum(-1) - 1
        types[is_text & (text_index >= prompt_length)] = TRANSCRIPT
    types[torch.arange(len(bos)), bos] = BOS
    types[~valid] = PAD
    return types


def processor_token_types(processor, batch) -> torch.Tensor:
    """token_types for a batch from `processor(...)`: the processor knows its marker ids and its prompt."""
    prompt = processor.tokenizer(processor.prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return token_types(batch["input_ids"], batch.get("attention_mask"), token_ids=processor.token_ids,
                       labels=batch.get("labels"), prompt_length=len(prompt))


def token_type_names(types: torch.Tensor) -> list[str]:
    return [TOKEN_TYPE_NAMES[int(t)] for t in types]


__all__ = ["AUDIO", "AUDIO_MARKER", "BOS", "PAD", "PROMPT", "TOKEN_TYPE_NAMES", "TRANSCRIPT", "VIDEO", "VIDEO_MARKER",
           "processor_token_types", "token_type_names", "token_types"]
