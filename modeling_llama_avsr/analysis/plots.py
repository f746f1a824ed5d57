"""The paper's figures as PNG files (matplotlib, Agg backend). Each function takes plain tensors (or report entries)
for one sample, so it can be fed from a report, a notebook or a test, and returns the file's path (or, given path None,
the matplotlib Figure). Token positions are the sample's own (padding removed)."""

import logging

import numpy as np
import torch

from .tokens import TOKEN_TYPE_NAMES

logger = logging.getLogger(__name__)

TYPE_COLORS = ("#ffffff", "#d62728", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#9467bd", "#1f77b4")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - matplotlib is in the analysis extra
        raise ImportError("The figures need matplotlib: pip install 'llama-avsr[analysis]' (or pip install "
                          "matplotlib)") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _np(x):
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _type_band(ax, types, plt, legend: bool = True):
    """A strip of token-type colours under a position axis, with a legend of the types present."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    types = _np(types).astype(int)
    ax.imshow(types[None, :], aspect="auto", cmap=ListedColormap(TYPE_COLORS), vmin=0, vmax=len(TYPE_COLORS) - 1,
              interpolation="nearest", extent=(-0.5, len(types) - 0.5, 0, 1))
    ax.set_yticks([])
    ax.set_xlabel("token position")
    if legend:
        present = sorted(set(types.tolist()) - {0})
        handles = [Patch(color=TYPE_COLORS[t], label=TOKEN_TYPE_NAMES[t]) for t in present]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -1.6), ncol=min(len(handles), 7),
                  fontsize=8, frameon=False, title="token type (band above)", title_fontsize=8)


def _save(fig, path, plt):
    """Write the figure and return its path; with path None, return the open Figure instead (notebooks)."""
    if path is None:
        return fig
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    logger.info("wrote %s", path)
    return str(path)


def plot_attention_scores(scores, types, path, title="Attention score per layer (eq. 5)", log: bool = True):
    """Fig. 1a-c: eq. 5 score of every token (x) at every layer (y), token types as a band underneath."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    scores = _np(scores)
    fig, (ax, band) = plt.subplots(2, 1, figsize=(max(7, scores.shape[1] * 0.12), 5.5), sharex=True,
                                   gridspec_kw={"height_ratios": [14, 1], "hspace": 0.05})
    norm = LogNorm(vmin=max(scores[scores > 0].min(), 1e-4), vmax=scores.max()) if log else None
    image = ax.imshow(scores, aspect="auto", origin="lower", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_ylabel("decoder layer")
    ax.set_title(title)
    colorbar = fig.colorbar(image, ax=[ax, band], fraction=0.04, pad=0.02)
    colorbar.set_label("attention score α (mean attention received; uniform = 1/N)")
    _type_band(band, types, plt)
    return _save(fig, path, plt)


def plot_activations_3d(hidden, types, path, layer: int, top_features: int = 3):
    """Fig. 1d: |H[i, j]| of one layer's (N, d) hidden state over tokens and features; the largest features named."""
    plt = _pyplot()
    magnitude = np.abs(_np(hidden))
    types = _np(types).astype(int)
    tokens, dim = magnitude.shape
    fig = plt.figure(figsize=(9, 6))
    ax = fig.add_subplot(projection="3d")
    features = np.arange(dim)
    for token in range(tokens):
        ax.plot(features, np.full(dim, token), magnitude[token], color=TYPE_COLORS[types[token]] if types[token] else
                "#7f7f7f", linewidth=0.8)
    top = np.argsort(magnitude.max(0))[::-1][:top_features]
    for feature in top:
        token = int(magnitude[:, feature].argmax())
        ax.text(feature, token, magnitude[token, feature], f" feature {feature}", fontsize=8)
    ax.set_xlabel("feature index j")
    ax.set_ylabel("token position i")
    ax.set_zlabel("|H[i, j]| (activation magnitude)")
    ax.set_title(f"Activation magnitudes, hidden-states entry {layer} (output of decoder layer {layer - 1})")
    from matplotlib.patches import Patch

    present = sorted(set(types.tolist()) - {0})
    ax.legend(handles=[Patch(color=TYPE_COLORS[t], label=TOKEN_TYPE_NAMES[t]) for t in present], fontsize=8,
              loc="upper left", title="token type", title_fontsize=8)
    return _save(fig, path, plt)


def plot_emergence(relative_scores, bos_index: int, intermediate, top_values, medians, path, origin=None,
                   threshold=None):
    """Fig. 2: (a) the sink statistic (relative score, statistics.relative_attention_scores) of BOS and of the
    strongest non-BOS token per layer, with the number of intermediate sinks (NaN entries: tokens too close to the end
    to be judged, left out); (b) largest |H| and median |H| per hidden-states entry; (c) optionally, at the layer where
    massive activations first appear, the massive feature split into residual input, attention output and MLP
    output."""
    plt = _pyplot()
    scores, intermediate = _np(relative_scores), _np(intermediate).astype(bool)
    top_values, medians = _np(top_values), _np(medians)
    layers = np.arange(scores.shape[0])
    panels = 3 if origin is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    others = np.delete(scores, bos_index, axis=1)
    ax.plot(layers, scores[:, bos_index], "o-", color=TYPE_COLORS[1], label="BOS")
    if np.isfinite(others).any():
        ax.plot(layers, np.nanmax(others, 1), "s-", color="#1f77b4", label="strongest non-BOS token")
        ax.plot(layers, np.nanmedian(others, 1), "--", color="#7f7f7f", label="median non-BOS token")
    if threshold is not None:
        ax.axhline(threshold, linestyle=":", color="black", label="sink threshold")
    ax.axhline(1.0, linestyle="-", color="#bbbbbb", linewidth=0.8, label="uniform causal attention")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("attention received, x uniform (log)")
    ax.set_title("(a) Emergence of attention sinks")
    twin = ax.twinx()
    twin.bar(layers, intermediate.sum(1), alpha=0.25, color="#2ca02c", label="# intermediate sinks")
    twin.set_ylabel("number of intermediate sinks")
    from matplotlib.ticker import MaxNLocator

    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = twin.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, fontsize=8, loc="lower right")
    ax = axes[1]
    entries = np.arange(len(top_values))
    ax.plot(entries, top_values, "o-", color=TYPE_COLORS[1], label="largest |H|")
    ax.plot(entries, medians, "s-", color="#7f7f7f", label="median |H|")
    ax.plot(entries, medians * 1000, ":", color="black", label="1000 × median (τ of eq. 6)")
    ax.set_yscale("log")
    ax.set_xlabel("hidden-states entry (0 = embeddings, l = output of decoder layer l-1)")
    ax.set_ylabel("activation magnitude (log)")
    ax.set_title("(b) Emergence of massive activations")
    ax.legend(fontsize=8)
    if origin is not None:
        ax = axes[2]
        summary = origin.summary()
        feature = str(origin.features[0])
        parts = summary["features"][feature]
        names = ["residual_in", "attention_out", "mlp_out"]
        x = np.arange(len(names))
        ax.bar(x - 0.2, [abs(parts[n]["sink"] or 0) for n in names], 0.4, color=TYPE_COLORS[1], label="sink tokens")
        ax.bar(x + 0.2, [abs(parts[n]["other"] or 0) for n in names], 0.4, color="#7f7f7f", label="other tokens")
        ax.set_xticks(x, ["layer input", "attention output", "MLP output"])
        ax.set_yscale("log")
        ax.set_ylabel(f"|value| of feature {feature} (log, mean over tokens)")
        ax.set_title(f"(c) Origin at decoder layer {origin.layer}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_bos_cosine(cosine, sink_tokens, pairwise, types, path, layer: int):
    """Fig. 3: (a) cosine with BOS across hidden-states entries, one line per intermediate sink token and the mean
    (with min-max band) of the non-sink tokens; (b) pairwise cosine of all token states at one entry, sinks marked."""
    plt = _pyplot()
    cosine, pairwise = _np(cosine), _np(pairwise)
    types = _np(types).astype(int)
    entries = np.arange(cosine.shape[0])
    sink_tokens = [t for t in sink_tokens if t != 0]
    others = [t for t in range(1, cosine.shape[1]) if t not in sink_tokens]
    fig = plt.figure(figsize=(13, 5))
    ax = fig.add_subplot(1, 2, 1)
    if others:
        values = cosine[:, others]
        ax.plot(entries, values.mean(1), "o-", color="#7f7f7f", label=f"non-sink tokens (mean of {len(others)})")
        ax.fill_between(entries, values.min(1), values.max(1), color="#7f7f7f", alpha=0.2)
    colors = plt.get_cmap("tab10")
    for index, token in enumerate(sink_tokens[:8]):
        ax.plot(entries, cosine[:, token], "s-", color=colors(index % 10), markersize=4,
                label=f"intermediate sink {token} ({TOKEN_TYPE_NAMES[types[token]]})")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("hidden-states entry (l = output of decoder layer l-1)")
    ax.set_ylabel("cos-sim(H[i], H[BOS]) (eq. 7)")
    ax.set_title("(a) Alignment with the BOS state (grey band: min-max)")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    image = ax.imshow(pairwise, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(f"(b) Pairwise cosine similarity, hidden-states entry {layer}")
    ax.set_xlabel("token position")
    ax.set_ylabel("token position")
    marked = [0] + sink_tokens
    ax.set_xticks(marked, [f"{t}*" for t in marked], fontsize=7, rotation=90)
    ax.set_yticks(marked, [f"{t}*" for t in marked], fontsize=7)
    ax.text(1.0, -0.17, "* BOS and intermediate sinks", transform=ax.transAxes, ha="right", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("cosine similarity")
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_intervention(effect: dict, path, feature: int | None = None):
    """Fig. 4 from one entry of the report's "interventions": each rotated token's attention score per layer and its
    largest activation (or |H| at `feature`, when the traces have it) per hidden-states entry, before and after the
    rotation into layer effect["layer"]. Tokens are named by their position in the sample (padding removed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    use_feature = feature is not None and all("feature_value" in t for t in effect["before"] + effect["after"])
    for index, token in enumerate(effect["tokens"]):
        color = colors(index % 10)
        for trace, style, when in ((effect["before"][index], "o-", "before"), (effect["after"][index], "s--", "after")):
            label = f"token {token}, {when}"
            axes[0].plot(np.arange(len(trace["score"])), trace["score"], style, color=color, label=label)
            values = trace["feature_value"] if use_feature else trace["max_abs_activation"]
            axes[1].plot(np.arange(len(values)), values, style, color=color, label=label)
    layer = effect["layer"]
    axes[0].set_xlabel("decoder layer")
    axes[0].set_ylabel("attention score α (eq. 5)")
    axes[0].set_yscale("log")
    axes[0].set_title("(a) Attention received")
    axes[1].set_xlabel(f"hidden-states entry (l = output of decoder layer l-1; entry {layer}: the rotated input)")
    axes[1].set_ylabel(f"|H[i, {feature}]| (log)" if use_feature else "max_j |H[i, j]| (log)")
    axes[1].set_yscale("log")
    axes[1].set_title("(b) Activation magnitude")
    for ax in axes:
        ax.axvline(layer, color="black", linestyle=":", label=f"rotation into layer {layer}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{effect['description']} (targets {effect['targets']}), layer {layer}")
    fig.tight_layout()
    return _save(fig, path, plt)


__all__ = ["TYPE_COLORS", "plot_activations_3d", "plot_attention_scores", "plot_bos_cosine", "plot_emergence",
           "plot_intervention"]
