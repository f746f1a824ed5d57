"""Attention scores (eq. 5) without ever holding an attention map.

transformers looks attention functions up by name (`AttentionInterface`), handing them the post-RoPE queries and the
keys/values before the GQA repeat. `record_attention_scores` switches the decoder to the "sink_scores" function for
the duration of a `with` block: it returns exactly what sdpa returns (the model keeps running sdpa), and additionally
recomputes the softmax probabilities query chunk by query chunk, summing each chunk over heads and queries into a (B, N)
column sum per layer. Peak extra memory is B x H x chunk x N floats, so a 3B model on 500 tokens analyses wherever its
forward fits. RoPE, GQA, scaling and masking are the model's own: we only see what the attention module passes on.

Only the (B, N) input `attention_mask` is read from outside the attention call (a pre-hook on the decoder): the 4D
mask tells which keys a query sees, but not which queries are padding under right padding.
"""

import contextlib
import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .statistics import visible_query_counts

logger = logging.getLogger(__name__)

SCORES_ATTENTION = "sink_scores"

# Attention module -> the recorder that wants its column sums. transformers gives an attention function only the module
# as context, so this is how the one registered function finds the recorder of the model it runs in.
_RECORDERS: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionScoreRecorder]" = weakref.WeakKeyDictionary()


def decoder_of(model) -> torch.nn.Module:
    """The decoder stack (a LlamaModel-like module with `.layers`) of a LlamaAVSR model or any causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(decoder, "layers"):
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} "
                         f"(looked at {type(decoder).__name__})")
    return decoder


def attention_probabilities(query, key, mask, scaling: float, groups: int, valid_queries=None) -> torch.Tensor:
    """Softmax probabilities (B, H, q, k) as eager attention computes them, from a 4D mask that may be None (causal,
    aligned bottom-right), boolean (True = attend) or additive float. Padded query rows are zero."""
    key = repeat_kv(key, groups)
    logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    q_len, k_len = logits.shape[-2:]
    if mask is None:
        rows = torch.arange(q_len, device=logits.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=logits.device)[None, :] <= rows
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    if valid_queries is not None:
        # where, not multiply: a padded row that sees nothing is NaN after the softmax
        probs = torch.where(valid_queries[:, None, :, None], probs, 0.0)
    return probs


class AttentionScoreRecorder:
    """Accumulates eq. 5 per layer while the model runs. Use through `record_attention_scores`."""

    def __init__(self, num_layers: int, query_chunk: int = 128):
        self.num_layers = num_layers
        self.query_chunk = query_chunk
        self.column_sums: dict[int, torch.Tensor] = {}
        self.num_heads: int | None = None
        self.attention_mask: torch.Tensor | None = None
        self.forwards = 0

    def _capture_mask(self, module, args, kwargs):
        # Only the first forward (the prefill under generate) is recorded: decoding steps add one query each.
        self.forwards += 1
        if self.forwards > 1:
            return
        self.attention_mask = kwargs.get("attention_mask")
        if self.attention_mask is not None and self.attention_mask.dim() != 2:
            raise ValueError("record_attention_scores needs the 2D (B, N) attention_mask, not a prepared 4D mask")

    def accumulate(self, module, query, key, mask, scaling):
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        valid_keys = self.attention_mask
        if valid_keys is None:
            valid_keys = torch.ones(batch, k_len, dtype=torch.bool, device=query.device)
        valid_queries = valid_keys[:, k_len - q_len:].bool().to(query.device)
        groups = heads // key.shape[1]
        total = torch.zeros(batch, k_len, dtype=torch.float32, device=query.device)
        for start in range(0, q_len, self.query_chunk):
            stop = min(start + self.query_chunk, q_len)
            chunk_mask = None if mask is None else mask[:, :, start:stop]
            if chunk_mask is None:  # causal and unpadded: the rows of this chunk, aligned bottom-right
                rows = torch.arange(start, stop, device=query.device)[:, None] + (k_len - q_len)
                chunk_mask = torch.arange(k_len, device=query.device)[None, :] <= rows
            probs = attention_probabilities(
                query[:, :, start:stop], key, chunk_mask, scaling, groups, valid_queries[:, start:stop]
            )
            total += probs.sum(dim=(1, 2))
        layer = module.layer_idx
        self.column_sums[layer] = self.column_sums.get(layer, 0) + total.detach()
        self.num_heads = heads

    def scores(self) -> torch.Tensor:
        """(B, L, N) eq. 5 scores of the (single, prefill) forward recorded."""
        if len(self.column_sums) != self.num_layers:
            raise RuntimeError(f"Recorded {len(self.column_sums)} of {self.num_layers} layers: run one forward inside "
                               "the `with` block")
        sums = torch.stack([self.column_sums[i] for i in range(self.num_layers)], dim=1)
        batch, _, length = sums.shape
        counts = visible_query_counts(self.attention_mask, batch, length, sums.device).clamp(min=1)
        return sums / (self.num_heads * counts[:, None, :].float())


def _sink_scores_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    recorder = _RECORDERS.get(module)
    if recorder is not None and recorder.forwards == 1:
        with torch.no_grad():
            recorder.accumulate(module, query, key, attention_mask, scaling if scaling is not None else module.scaling)
    return output


AttentionInterface.register(SCORES_ATTENTION, _sink_scores_attention)
# The same masks as sdpa, so the outputs are sdpa's to the last bit.
AttentionMaskInterface.register(SCORES_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run the decoder of `model` (only the decoder: the encoders keep theirs) with attention function `name`."""
    decoder = decoder_of(model)
    previous = decoder.config._attn_implementation
    decoder.set_attn_implementation(name)
    try:
        yield decoder
    finally:
        decoder.set_attn_implementation(previous)


@contextlib.contextmanager
def record_attention_scores(model, query_chunk: int = 128):
    """Within the block, one forward of `model` records eq. 5 for every decoder layer; read `recorder.scores()`.

        with record_attention_scores(model) as recorder:
            model(**batch)
        scores = recorder.scores()  # (B, L, N)
    """
    decoder = decoder_of(model)
    recorder = AttentionScoreRecorder(len(decoder.layers), query_chunk)
    handle = decoder.register_forward_pre_hook(recorder._capture_mask, with_kwargs=True)
    for layer in decoder.layers:
        _RECORDERS[layer.self_attn] = recorder
    try:
        with attention_implementation(model, SCORES_ATTENTION):
            yield recorder
    finally:
        handle.remove()
        for layer in decoder.layers:
            _RECORDERS.pop(layer.self_attn, None)




class Measurement:
    """What one analysed forward gives: eq. 5 scores (B, L, N), the hidden-states tuple (L+1 entries of (B, N, d)), the
    attention mask and the logits."""

    def __init__(self, scores, hidden_states, attention_mask, logits):
        self.scores = scores
        self.hidden_states = hidden_states
        self.attention_mask = attention_mask
        self.logits = logits


@torch.no_grad()
def measure(model, inputs, query_chunk: int = 128) -> Measurement:
    """One forward of `model` on `inputs` (a dict of model inputs) that records scores and hidden states."""
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    with record_attention_scores(model, query_chunk) as recorder:
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
    mask = inputs.get("attention_mask")
    return Measurement(recorder.scores(), tuple(h.detach() for h in outputs.hidden_states), mask, outputs.logits)


__all__ = ["AttentionScoreRecorder", "Measurement", "SCORES_ATTENTION", "attention_implementation",
           "attention_probabilities", "decoder_of", "measure", "record_attention_scores"]
