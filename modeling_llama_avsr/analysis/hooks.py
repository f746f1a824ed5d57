"""Attention scores (eq. 5) and the relative scores of sink detection, recorded while the model runs the attention it
is set to run, without ever holding an attention map; `measure`.

The recorder never changes what the model computes:
- an attention implementation that returns its probabilities (eager, ACT's "act", or any custom function that does)
  is left in place; a forward hook on each attention module reads the probabilities it returned;
- one that returns none (sdpa, flash, flex) is wrapped: the decoder switches to "sink_scores_<name>", which calls the
  very same function for the output (so the outputs are that implementation's to the last bit) and recomputes the
  softmax probabilities from the post-RoPE queries and keys and the mask it was given, query chunk by query chunk.
Peak extra memory is then B x H x chunk x N floats, so a 3B model on 500 tokens analyses wherever its forward fits.

Only the (B, N) input `attention_mask` is read from outside the attention call (a pre-hook on the decoder): the 4D
mask tells which keys a query sees, but not which queries are padding under right padding.
"""

import contextlib
import logging
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .statistics import SINK_WINDOW, detect_sinks, distant_query_counts, keys_seen, visible_query_counts

logger = logging.getLogger(__name__)

SCORES_ATTENTION = "sink_scores"
# Registered implementations known to return no probabilities; anything else must return them to be measured.
WEIGHTLESS_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")

# Attention module -> the recorder that wants its statistics. transformers gives an attention function only the module
# as context, so this is how the registered functions find the recorder of the model they run in.
_RECORDERS: "weakref.WeakKeyDictionary[torch.nn.Module, AttentionScoreRecorder]" = weakref.WeakKeyDictionary()


def decoder_of(model) -> torch.nn.Module:
    """The decoder stack (a LlamaModel-like module with `.layers`) of a LlamaAVSR model or any causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(decoder, "layers"):
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__} "
                         f"(looked at {type(decoder).__name__})")
    return decoder


def visible_keys(mask, q_len: int, k_len: int, device) -> torch.Tensor:
    """Bool (B or 1, q, k) of the keys each query may attend, from the mask an attention function receives: None
    (causal, aligned bottom-right), a 4D boolean (True = attend) or additive float mask, or a 2D (B, k) padding mask
    (flash attention's), combined with the causal mask."""
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    causal = (torch.arange(k_len, device=device)[None, :] <= rows)[None]
    if mask is None:
        return causal
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Cannot read an attention mask of type {type(mask).__name__} (flex attention's BlockMask?): "
                        "measure with attn_implementation 'sdpa' or 'eager'")
    if mask.dim() == 2:
        return causal & mask.bool().to(device)[:, None, :]
    mask = mask[:, 0]  # one mask for all heads in transformers' Llama-like models
    return mask.to(device) if mask.dtype == torch.bool else mask.to(device) == 0


def attention_probabilities(query, key, mask, scaling: float, groups: int, valid_queries=None) -> torch.Tensor:
    """Softmax probabilities (B, H, q, k) in float32 as eager attention computes them, from a mask that
    `visible_keys` reads. Padded query rows (`valid_queries` False) are zero."""
    key = repeat_kv(key, groups)
    logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
    q_len, k_len = logits.shape[-2:]
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype != torch.bool:
        logits = logits + mask.float()  # eager's additive mask, exactly as eager adds it
    else:
        logits = logits.masked_fill(~visible_keys(mask, q_len, k_len, logits.device)[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if valid_queries is not None:
        # where, not multiply: a padded row that sees nothing is NaN after the softmax
        probs = torch.where(valid_queries[:, None, :, None], probs, 0.0)
    return probs


class AttentionScoreRecorder:
    """Accumulates, per layer, the column sums of eq. 5 and of the relative score while the model runs. Use through
    `record_attention_scores`."""

    def __init__(self, num_layers: int, query_chunk: int = 128, window: int = SINK_WINDOW):
        self.num_layers = num_layers
        self.query_chunk = query_chunk
        self.window = window
        self.column_sums: dict[int, torch.Tensor] = {}
        self.relative_sums: dict[int, torch.Tensor] = {}
        self.num_heads: int | None = None
        self.attention_mask: torch.Tensor | None = None
        self.forwards = 0
        self.last_layer_output: torch.Tensor | None = None

    @property
    def recording(self) -> bool:
        # Only the first forward (the prefill under generate) is recorded: decoding steps add one query each.
        return self.forwards == 1

    def _capture_mask(self, module, args, kwargs):
        self.forwards += 1
        if not self.recording:
            return
        self.attention_mask = kwargs.get("attention_mask")
        if self.attention_mask is not None and self.attention_mask.dim() != 2:
            raise ValueError("record_attention_scores needs the 2D (B, N) attention_mask, not a prepared 4D mask")

    def _valid_keys(self, batch, k_len, device):
        if self.attention_mask is None:
            return torch.ones(batch, k_len, dtype=torch.bool, device=device)
        return self.attention_mask.bool().to(device)

    def _add(self, layer: int, probs: torch.Tensor, start: int, q_len: int, valid_keys: torch.Tensor):
        """Add a chunk of probabilities (B, H, c, k) of queries start..start+c (of q_len, aligned bottom-right)."""
        batch, heads, chunk, k_len = probs.shape
        offset = k_len - q_len + start  # key position of the chunk's first query
        queries = torch.arange(offset, offset + chunk, device=probs.device)
        valid_queries = valid_keys[:, queries]
        probs = torch.where(valid_queries[:, None, :, None], probs.float(), 0.0)
        weight = torch.where(valid_queries, keys_seen(valid_keys, batch, k_len, probs.device)[:, queries], 0)
        far = (queries[:, None] - torch.arange(k_len, device=probs.device)[None, :]) >= self.window
        relative = torch.where(far, probs.mean(1) * weight[:, :, None].float(), 0.0).sum(1)
        self.column_sums[layer] = self.column_sums.get(layer, 0) + probs.sum(dim=(1, 2)).detach()
        self.relative_sums[layer] = self.relative_sums.get(layer, 0) + relative.detach()
        self.num_heads = heads

    def accumulate(self, module, query, key, mask, scaling):
        """From the queries and keys an attention function received (weightless implementations)."""
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        valid_keys = self._valid_keys(batch, k_len, query.device)
        valid_queries = valid_keys[:, k_len - q_len:]
        groups = heads // key.shape[1]
        for start in range(0, q_len, self.query_chunk):
            stop = min(start + self.query_chunk, q_len)
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                chunk_mask = mask[:, :, start:stop]
            else:  # None or a 2D padding mask: this chunk's causal rows (visible_keys rejects anything else)
                chunk_mask = visible_keys(mask, q_len, k_len, query.device)[:, None, start:stop]
            probs = attention_probabilities(query[:, :, start:stop], key, chunk_mask, scaling, groups,
                                            valid_queries[:, start:stop])
            self._add(module.layer_idx, probs, start, q_len, valid_keys)

    def _read_weights(self, module, args, output):
        """Forward hook on an attention module: use the probabilities it returned, when it returns them."""
        if not self.recording or module.layer_idx in self.column_sums:
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            return  # a wrapped weightless implementation records itself; `scores` reports layers that did not
        with torch.no_grad():
            batch, _, q_len, k_len = weights.shape
            valid_keys = self._valid_keys(batch, k_len, weights.device)
            for start in range(0, q_len, self.query_chunk):
                self._add(module.layer_idx, weights[:, :, start:start + self.query_chunk], start, q_len, valid_keys)

    def _capture_last_layer(self, module, args, output):
        if self.recording:
            self.last_layer_output = (output[0] if isinstance(output, tuple) else output).detach()

    def _stacked(self, sums):
        if len(sums) != self.num_layers:
            raise RuntimeError(
                f"Recorded {len(sums)} of {self.num_layers} layers: run one forward inside the `with` block, with an "
                "attention implementation that returns its probabilities or one of " + ", ".join(WEIGHTLESS_ATTENTION))
        return torch.stack([sums[i] for i in range(self.num_layers)], dim=1)

    def scores(self) -> torch.Tensor:
        """(B, L, N) eq. 5 scores of the (single, prefill) forward recorded."""
        sums = self._stacked(self.column_sums)
        batch, _, length = sums.shape
        counts = visible_query_counts(self.attention_mask, batch, length, sums.device).clamp(min=1)
        return sums / (self.num_heads * counts[:, None, :].float())

    def relative_scores(self) -> torch.Tensor:
        """(B, L, N) relative scores (statistics.relative_attention_scores) of the forward recorded."""
        sums = self._stacked(self.relative_sums)
        batch, _, length = sums.shape
        counts = distant_query_counts(self.attention_mask, batch, length, self.window, sums.device).clamp(min=1)
        return sums / counts[:, None, :].float()


def _recording_attention(function):
    def recording(module, query, key, value, attention_mask, scaling=None, **kwargs):
        output = function(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        recorder = _RECORDERS.get(module)
        if recorder is not None and recorder.recording:
            with torch.no_grad():
                recorder.accumulate(module, query, key, attention_mask,
                                    scaling if scaling is not None else module.scaling)
        return output

    return recording


def recording_implementation(name: str) -> str:
    """The name of the recording wrapper of the weightless implementation `name`, registered (with the same mask
    function) on first use."""
    wrapped = f"{SCORES_ATTENTION}_{name}"
    if wrapped not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(wrapped, _recording_attention(ALL_ATTENTION_FUNCTIONS[name]))
        if name in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(wrapped, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return wrapped


recording_implementation("sdpa")  # at import, so that the common case never registers anything later


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
def record_attention_scores(model, query_chunk: int = 128, window: int = SINK_WINDOW):
    """Within the block, one forward of `model` records eq. 5 and the relative scores for every decoder layer, under
    the attention implementation the decoder is set to (ACT included); read `recorder.scores()`,
    `recorder.relative_scores()`.

        with record_attention_scores(model) as recorder:
            model(**batch)
        scores = recorder.scores()  # (B, L, N)
    """
    decoder = decoder_of(model)
    recorder = AttentionScoreRecorder(len(decoder.layers), query_chunk, window)
    handles = [decoder.register_forward_pre_hook(recorder._capture_mask, with_kwargs=True),
               decoder.layers[-1].register_forward_hook(recorder._capture_last_layer)]
    for layer in decoder.layers:
        _RECORDERS[layer.self_attn] = recorder
        handles.append(layer.self_attn.register_forward_hook(recorder._read_weights))
    current = decoder.config._attn_implementation
    context = contextlib.nullcontext()
    if current in WEIGHTLESS_ATTENTION:
        context = attention_implementation(model, recording_implementation(current))
    try:
        with context:
            yield recorder
    finally:
        for handle in handles:
            handle.remove()
        for layer in decoder.layers:
            _RECORDERS.pop(layer.self_attn, None)


class Measurement:
    """What one analysed forward gives:

    scores: (B, L, N) eq. 5; relative_scores: (B, L, N) the sink statistic (statistics.relative_attention_scores,
    computed with `window`); hidden_states: the transformers tuple (L+1 entries of (B, N, d), the last one after the
    final norm); last_layer_output: (B, N, d) the last decoder layer's own output, before the final norm;
    attention_mask; logits."""

    def __init__(self, scores, hidden_states, attention_mask, logits, relative_scores=None, window=SINK_WINDOW,
                 last_layer_output=None):
        self.scores = scores
        self.relative_scores = relative_scores
        self.window = window
        self.hidden_states = hidden_states
        self.last_layer_output = last_layer_output
        self.attention_mask = attention_mask
        self.logits = logits

    @property
    def raw_hidden_states(self) -> tuple:
        """The hidden-states tuple with its last entry replaced by the last decoder layer's raw output: entry l is
        the output of decoder layer l-1 for every l >= 1, none of them normed."""
        return (*self.hidden_states[:-1], self.last_layer_output)

    def sinks(self, **rule):
        """`detect_sinks` on this forward (keyword arguments: threshold, min_queries)."""
        return detect_sinks(self.relative_scores, self.attention_mask, window=self.window, **rule)


@torch.no_grad()
def measure(model, inputs, query_chunk: int = 128, window: int = SINK_WINDOW) -> Measurement:
    """One forward of `model` on `inputs` (a dict of model inputs, labels included if any: they define ACT's prompt)
    that records scores and hidden states under the attention the model is set to run."""
    with record_attention_scores(model, query_chunk, window) as recorder:
        outputs = model(**inputs, output_hidden_states=True, use_cache=False)
    mask = inputs.get("attention_mask")
    return Measurement(recorder.scores(), tuple(h.detach() for h in outputs.hidden_states), mask, outputs.logits,
                       relative_scores=recorder.relative_scores(), window=window,
                       last_layer_output=recorder.last_layer_output)


__all__ = ["AttentionScoreRecorder", "Measurement", "SCORES_ATTENTION", "WEIGHTLESS_ATTENTION",
           "attention_implementation", "attention_probabilities", "decoder_of", "measure", "record_attention_scores",
           "recording_implementation", "visible_keys"]
