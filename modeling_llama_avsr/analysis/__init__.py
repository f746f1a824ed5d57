"""Attention sinks, massive activations and BOS alignment in LlamaAVSR (and any Llama-like causal LM), after
"Mitigating Attention Sinks and Massive Activations in Audio-Visual Speech Recognition with LLMs".

statistics.py  eq. 5-7 on transformers outputs, the relative score and sink detection, per-layer statistics
hooks.py       eq. 5 and the relative score recorded under the model's own attention (no maps kept), `measure`
tokens.py      token-type labels of the LlamaAVSR sequence layout
origin.py      where massive activations come from: residual / attention / gated-MLP attribution
interventions.py  eq. 8 / 9 rotations by forward pre-hooks
act.py         ACT (Yu et al., 2024), the paper's baseline, as an attention function, and its head search
plots.py       the paper's figures; report.py  JSON + markdown + figures, `llama-avsr analyze`
callbacks.py   SinkMonitorCallback for Trainer
"""

from .act import (
    ACTConfig,
    ACTSession,
    HeadSearchResult,
    act_calibration,
    active_session,
    calibrate,
    disable_act,
    enable_act,
    find_sinks,
    search_act_heads,
)
from .callbacks import SinkMonitorCallback, sink_metrics, sink_profile, sink_report
from .hooks import Measurement, attention_implementation, decoder_of, measure, record_attention_scores
from .interventions import Rotation, nearest_non_sink, rotate_hidden_state, rotate_toward
from .origin import MLPOrigin, mlp_origin
from .report import add_analyze_arguments, analyze, run_analyze, summary_markdown
from .statistics import (
    SINK_MIN_QUERIES,
    SINK_THRESHOLD,
    SINK_WINDOW,
    LayerActivationStats,
    Sinks,
    attention_scores,
    bos_cosine_similarity,
    bos_positions,
    detect_sinks,
    first_massive_layer,
    layer_statistics,
    massive_activations,
    pairwise_cosine,
    relative_attention_scores,
)
from .tokens import TOKEN_TYPE_NAMES, processor_token_types, token_types

__all__ = [
    "ACTConfig",
    "ACTSession",
    "HeadSearchResult",
    "LayerActivationStats",
    "MLPOrigin",
    "Measurement",
    "Rotation",
    "SINK_MIN_QUERIES",
    "SINK_THRESHOLD",
    "SINK_WINDOW",
    "SinkMonitorCallback",
    "Sinks",
    "TOKEN_TYPE_NAMES",
    "act_calibration",
    "active_session",
    "add_analyze_arguments",
    "analyze",
    "attention_implementation",
    "attention_scores",
    "bos_cosine_similarity",
    "bos_positions",
    "calibrate",
    "decoder_of",
    "detect_sinks",
    "disable_act",
    "enable_act",
    "find_sinks",
    "first_massive_layer",
    "layer_statistics",
    "massive_activations",
    "measure",
    "mlp_origin",
    "nearest_non_sink",
    "pairwise_cosine",
    "processor_token_types",
    "record_attention_scores",
    "relative_attention_scores",
    "rotate_hidden_state",
    "rotate_toward",
    "run_analyze",
    "search_act_heads",
    "sink_metrics",
    "sink_profile",
    "sink_report",
    "summary_markdown",
    "token_types",
]
