"""One call that runs the whole analysis of the paper's Sec. 3 on a batch and writes a JSON report, the figures and a
markdown summary; plus the `llama-avsr analyze` command line."""

import json
import logging
from pathlib import Path

import torch

from . import plots
from .hooks import measure
from .interventions import rotate_hidden_state
from .origin import mlp_origin
from .statistics import (
    SINK_MIN_QUERIES,
    SINK_THRESHOLD,
    bos_cosine_similarity,
    detect_sinks,
    distant_query_counts,
    first_massive_layer,
    layer_statistics,
    massive_activations,
    pairwise_cosine,
)
from .tokens import BOS, PAD, PROMPT, TOKEN_TYPE_NAMES

logger = logging.getLogger(__name__)

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. Then it runs into the forest, where the trees are tall "
                "and the air is cold.")


def _sample_view(tensor, valid, dim):
    """Keep sample 0's attended positions along `dim`."""
    index = valid.nonzero().flatten().to(tensor.device)
    return tensor.index_select(dim, index)


def _trace(run, hidden_states, sinks, token, mask, tau, feature=None) -> dict:
    """Sample 0's token `token` (tensor position) across layers: eq. 5 and relative scores, the layers where it is a
    sink, its largest |H| (and |H| at `feature`) per entry of `hidden_states` and the entries where it is massive."""
    massive = [int(entry) for entry, h in enumerate(hidden_states)
               if massive_activations(h[:1], None if mask is None else mask[:1], tau)[0, token].any()]
    trace = {"score": [round(float(s), 5) for s in run.scores[0, :, token]],
             "relative_score": [round(float(s), 3) for s in run.relative_scores[0, :, token]],
             "sink_layers": sinks.mask[0, :, token].nonzero().flatten().tolist(),
             "max_abs_activation": [round(float(h[0, token].abs().max()), 3) for h in hidden_states],
             "massive_entries": massive}
    if feature is not None:
        trace["feature_value"] = [round(float(h[0, token, feature].abs()), 3) for h in hidden_states]
    return trace


def _rotation_effect(model, inputs, before, before_sinks, layer, tokens, toward, others, tau, rule, feature, own):
    """Run one rotation; return (after measurement, JSON summary in sample-0 positions). `tokens` and `others` are
    tensor positions of sample 0. Traces read the honest tuple: entry `layer` is what layer `layer` received."""
    with rotate_hidden_state(model, layer, tokens, toward=toward, sinks=others) as rotation:
        after = measure(model, inputs)
    mask = inputs.get("attention_mask")
    after_sinks = detect_sinks(after.relative_scores, mask, window=after.window, **rule)
    after_states = rotation.traced(after.raw_hidden_states)
    effect = {"layer": layer, "tokens": [own(t) for t in tokens],
              "toward": toward if isinstance(toward, str) else own(toward),
              "targets": [own(t) for t in rotation.targets[0]],
              "before": [_trace(before, before.raw_hidden_states, before_sinks, t, mask, tau, feature) for t in tokens],
              "after": [_trace(after, after_states, after_sinks, t, mask, tau, feature) for t in tokens]}
    return after, effect


@torch.no_grad()
def analyze(model, inputs, types=None, out_dir=None, tokens=None, threshold: float = SINK_THRESHOLD,
            tau: float = 1000.0, top_k: int = 5, interventions: bool = True, figure_layer: int | None = None,
            min_queries: int = SINK_MIN_QUERIES, eq8_toward: str = "nearest") -> dict:
    """The paper's analysis of sample 0 of `inputs` (a dict of model inputs, labels included if any; statistics that
    are cheap are also given for the whole batch), under whatever attention the model runs (ACT included).

    types: (B, N) token types (see tokens.py); tokens: sample 0's token strings (for the report). threshold,
    min_queries: the sink rule (statistics.detect_sinks). eq8_toward: eq. 8's f(i), "nearest" (position) or
    "most_similar" (cosine). Writes `report.json`, `summary.md` and the figures to `out_dir` when given; returns the
    report dict (plain JSON values). Per-layer activation statistics read each decoder layer's own output (the last
    one before the final norm; `final_norm` gives the normed entry)."""
    model.eval()
    mask = inputs.get("attention_mask")
    run = measure(model, inputs)
    batch, num_layers, length = run.scores.shape
    valid = (mask[0].bool() if mask is not None else torch.ones(length, dtype=torch.bool)).cpu()
    if types is None:
        types = torch.full((batch, length), PROMPT)
        types[0, int(valid.long().argmax())] = BOS
        types[0, ~valid] = PAD
    rule = {"threshold": threshold, "min_queries": min_queries}
    sinks = detect_sinks(run.relative_scores, mask, window=run.window, **rule)
    hidden = run.raw_hidden_states
    stats = layer_statistics(hidden, mask, top_k, tau)
    normed = layer_statistics(run.hidden_states[-1:], mask, 1, tau)
    cosine = bos_cosine_similarity(hidden, mask)
    offset = int(valid.long().argmax())  # sample-0 tensor position of its BOS (left padding)

    def own(position):  # tensor position -> sample-0 position
        return int(position) - offset

    layers = []
    for layer in range(num_layers):
        entry = layer + 1  # the hidden state this layer outputs
        layers.append({
            "layer": layer,
            "bos_score": round(float(run.scores[0, layer, offset]), 5),
            "bos_relative_score": round(float(run.relative_scores[0, layer, offset]), 3),
            "bos_is_sink": bool(sinks.bos[0, layer]),
            "intermediate_sinks": [own(p) for p in sinks.positions(0, layer)],
            "intermediate_sink_types": [TOKEN_TYPE_NAMES[int(types[0, p])] for p in sinks.positions(0, layer)],
            "top_activation": round(float(stats.top_values[0, entry, 0]), 3),
            "top_activation_token": own(stats.top_tokens[0, entry, 0]),
            "top_activation_feature": int(stats.top_features[0, entry, 0]),
            "median_activation": round(float(stats.median[0, entry]), 5),
            "ratio": round(float(stats.ratio[0, entry]), 2),
            "massive_tokens": [own(p) for p in stats.massive_tokens[0][entry]],
            "massive_features": stats.massive_features[0][entry],
        })
    bos_sink_layers = [l["layer"] for l in layers if l["bos_is_sink"]]
    sink_positions = sorted({p for l in range(num_layers) for p in sinks.positions(0, l)})
    first_entry = first_massive_layer(stats)
    report = {
        "num_layers": num_layers, "num_tokens": int(valid.sum()), "sink_rule": sinks.rule(), "tau": tau,
        "tokens": tokens, "token_types": [TOKEN_TYPE_NAMES[int(t)] for t in types[0][valid]],
        "bos_sink_layers": bos_sink_layers,
        "intermediate_sinks": {own(p): [l for l in range(num_layers) if sinks.intermediate[0, l, p]]
                               for p in sink_positions},
        "first_massive_entry": first_entry,
        "massive_features": sorted({f for l in layers for f in l["massive_features"]}),
        "max_ratio": round(float(stats.ratio[0].max()), 2),
        "final_norm": {"ratio": round(float(normed.ratio[0, 0]), 2),
                       "massive_tokens": [own(p) for p in normed.massive_tokens[0][0]],
                       "massive_features": normed.massive_features[0][0]},
        "layers": layers,
        "batch": {
            "intermediate_sinks_per_sample": sinks.intermediate.any(1).sum(-1).tolist(),
            "max_ratio_per_sample": [round(float(r), 2) for r in stats.ratio.amax(1)],
            "sinks": sinks.summary(types),
        },
    }
    non_sinks = [p for p in valid.nonzero().flatten().tolist() if p not in sink_positions and p != offset]
    report["cos_to_bos"] = {
        "intermediate_sinks": [round(float(cosine[0, e, sink_positions].mean()), 4) if sink_positions else None
                               for e in range(num_layers + 1)],
        "non_sinks": [round(float(cosine[0, e, non_sinks].mean()), 4) for e in range(num_layers + 1)],
        **_ordinary_alignment(hidden, non_sinks, offset, report["massive_features"]),
    }
    # Eq. 10's term for sample 0 (entries 2..L-1, every token but BOS) and the part of it the intermediate sinks make:
    # what the decorrelation loss would push on, sinks against ordinary tokens.
    squared = cosine[0, 2:num_layers, sink_positions + non_sinks].square()
    if squared.numel():
        report["eq10"] = {"term": round(float(squared.mean()), 4),
                          "share_from_intermediate_sinks": round(float(squared[:, :len(sink_positions)].sum()
                                                                       / squared.sum().clamp_min(1e-12)), 4)}

    origin = None
    if first_entry is not None and first_entry > 0:
        # The MLP of decoder layer first_entry - 1 makes the first massive activations; its sink group comes from
        # attention: the sinks of the next layer, the first attention that reads them.
        origin_layer = first_entry - 1
        reader = min(first_entry, num_layers - 1)
        sink_group = sinks.mask[0, reader].nonzero().flatten().tolist()
        features = stats.massive_features[0][first_entry]
        by_size = sorted(features, key=lambda f: -float(hidden[first_entry][0, :, f].abs().max()))[:3]
        if sink_group:
            origin = mlp_origin(model, inputs, origin_layer, by_size, sink_group)
            report["mlp_origin"] = {**origin.summary(), "sink_group_from_layer": reader}
        else:
            report["mlp_origin"] = {"layer": origin_layer, "skipped": f"no attention sink in layer {reader}"}

    feature = stats.top_features[0, first_entry, 0].item() if first_entry is not None else None
    rotations = []
    if interventions:
        # Eq. 8: the intermediate sinks of one layer rotated at once (the paper rotates {20, 21} together) toward
        # their f(i), into the first layer where the most persistent intermediate sink is one.
        if sink_positions:
            persistent = int(sinks.intermediate[0].sum(0).argmax())
            layer = int(sinks.intermediate[0, :, persistent].nonzero()[0])
            chosen = sinks.positions(0, layer)
            others = [p for p in sink_positions if p not in chosen]
            after, effect = _rotation_effect(model, inputs, run, sinks, layer, chosen, eq8_toward, others, tau, rule,
                                             feature, own)
            effect["description"] = (f"eq. 8: intermediate sinks {effect['tokens']} rotated toward f(i) "
                                     f"({eq8_toward})")
            rotations.append((after, effect))
        # Eq. 9: the ordinary token least aligned with BOS, rotated toward BOS where massive activations are made;
        # among the tokens that enough queries see from afar, or the rule could not tell whether it became a sink.
        judged = distant_query_counts(valid[None], 1, len(valid), sinks.window)[0] >= sinks.min_queries
        ordinary = [p for p in non_sinks if int(types[0, p]) not in (PAD, BOS) and judged[p]]
        if ordinary:
            layer = (first_entry - 1) if first_entry else min(2, num_layers - 1)
            token = ordinary[int(cosine[0, layer, ordinary].argmin())]
            after, effect = _rotation_effect(model, inputs, run, sinks, layer, [token], "bos", [], tau, rule,
                                             feature, own)
            effect["description"] = f"eq. 9: ordinary token {own(token)} rotated toward BOS"
            rotations.append((after, effect))
        report["interventions"] = [effect for _, effect in rotations]

    figure_layer = figure_layer if figure_layer is not None else _figure_entry(run.scores, sinks, stats, offset)
    report["figure_entry"] = figure_layer
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report["figures"] = _figures(out, run, hidden, valid, types[0][valid], sinks, stats, cosine, origin,
                                     report.get("interventions", []), figure_layer, feature)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "summary.md").write_text(summary_markdown(report))
        logger.info("wrote %s and %s", out / "report.json", out / "summary.md")
    return report


def _ordinary_alignment(hidden, ordinary: list[int], bos: int, features: list[int]) -> dict:
    """Why ordinary tokens sit at the cosine they do to BOS, per hidden-states entry of sample 0 (eq. 10 penalises
    every one of them, not only the sinks):
    - non_sinks_pairwise: their mean cosine to each other: as high as to BOS means a direction all tokens share;
    - non_sinks_without_massive: their cosine to BOS with BOS's massive features (`features`) zeroed in both states;
    - non_sinks_massive_share: the share of their squared norm in those features."""
    if len(ordinary) < 2:
        return {}
    index = torch.tensor(ordinary)
    off_diagonal = ~torch.eye(len(ordinary), dtype=torch.bool)
    pairwise, without, share = [], [], []
    for state in hidden:
        x = state[0].detach().float().cpu()
        pairwise.append(round(float(pairwise_cosine(x[index])[off_diagonal].mean()), 4))
        if features:
            kept = x.clone()
            kept[:, features] = 0
            unit = torch.nn.functional.normalize(kept, dim=-1, eps=1e-12)
            without.append(round(float((unit[index] @ unit[bos]).mean()), 4))
            share.append(round(float((x[index][:, features].square().sum(-1) / x[index].square().sum(-1)
                                      .clamp_min(1e-12)).mean()), 4))
    out = {"non_sinks_pairwise": pairwise}
    if features:
        out.update(non_sinks_without_massive=without, non_sinks_massive_share=share)
    return out


def _figures(out, run, hidden, valid, types, sinks, stats, cosine, origin, effects, figure_layer, feature):
    scores = _sample_view(run.scores[0], valid, 1)
    n = int(valid.sum())
    figures = {"attention_scores": plots.plot_attention_scores(
        scores, types, out / "fig1_attention_scores.png",
        title=f"Attention score per layer (eq. 5), {n} tokens")}
    entry = figure_layer
    state = _sample_view(hidden[entry][0], valid, 0)
    figures["activations_3d"] = plots.plot_activations_3d(state, types, out / "fig1d_activations_3d.png", entry)
    intermediate = _sample_view(sinks.intermediate[0], valid, 1)
    eligible = distant_query_counts(valid[None], 1, len(valid), sinks.window)[0] >= sinks.min_queries
    relative = torch.where(eligible[None, :], run.relative_scores[0].cpu(), float("nan"))
    figures["emergence"] = plots.plot_emergence(
        _sample_view(relative, valid, 1), 0, intermediate, stats.top_values[0, :, 0], stats.median[0],
        out / "fig2_emergence.png", origin=origin, threshold=sinks.threshold)
    sink_tokens = sorted({int(p) for p in intermediate.any(0).nonzero().flatten()})
    figures["bos_cosine"] = plots.plot_bos_cosine(
        _sample_view(cosine[0], valid, 1), sink_tokens, pairwise_cosine(state), types, out / "fig3_bos_cosine.png",
        entry)
    for index, effect in enumerate(effects):
        figures[f"intervention_{index}"] = plots.plot_intervention(
            effect, out / f"fig4_intervention_{index}.png", feature=feature)
    return figures


def _figure_entry(scores, sinks, stats, bos: int) -> int:
    """Hidden-states entry shown in Fig. 1d / 3b (the paper's layer 5): the first entry where the most non-BOS tokens
    carry massive activations; failing that, the input of the layer whose intermediate sinks draw the most attention;
    else the first entry with massive activations, else entry 5. `bos`: sample 0's BOS position."""
    non_bos = [len(set(tokens) - {bos}) for tokens in stats.massive_tokens[0]]
    if max(non_bos) > 0:
        return non_bos.index(max(non_bos))
    mass = (scores[0] * sinks.intermediate[0]).sum(-1)
    if mass.max() > 0:
        return max(int(mass.argmax()), 1)
    last = stats.massive_counts.shape[1] - 2
    return next((e for e in range(1, last + 1) if stats.massive_counts[0, e] > 0), min(5, last))


def summary_markdown(report: dict) -> str:
    tokens = report.get("tokens")

    def name(position):
        kind = report["token_types"][position]
        text = f" {tokens[position]!r}" if tokens else ""
        return f"{position} ({kind}{text})"

    rule = report["sink_rule"]
    lines = ["# Attention sinks and massive activations", "",
             f"{report['num_tokens']} tokens, {report['num_layers']} decoder layers; sink: the queries at least "
             f"{rule['window']} positions later (at least {rule['min_queries']} of them) give the token more than "
             f"{rule['threshold']:g} x the attention of uniform causal attention; massive: |H| >= {report['tau']:g} x "
             "median(|H|).", ""]
    bos = report["bos_sink_layers"]
    lines.append(f"- BOS sink in {len(bos)} of {report['num_layers']} layers: {_ranges(bos)}")
    if report["intermediate_sinks"]:
        for position, layers in report["intermediate_sinks"].items():
            lines.append(f"- intermediate sink at token {name(int(position))}: layers {_ranges(layers)}")
    else:
        lines.append("- no intermediate sinks")
    if report["first_massive_entry"] is not None:
        entries = [l["layer"] + 1 for l in report["layers"] if l["massive_features"]]
        lines.append(f"- massive activations in hidden-states entries {_ranges(entries)} (first made by decoder layer "
                     f"{report['first_massive_entry'] - 1}), features {report['massive_features']}, largest / median "
                     f"ratio {report['max_ratio']:.0f}")
        tokens_with = sorted({t for l in report["layers"] for t in l["massive_tokens"]})
        lines.append(f"- tokens with massive activations: {[name(t) for t in tokens_with]}")
    else:
        lines.append(f"- no massive activations (largest / median ratio {report['max_ratio']:.0f})")
    final = report["final_norm"]
    lines.append(f"- after the final norm: largest / median ratio {final['ratio']:.0f}, massive features "
                 f"{final['massive_features'] or 'none'}")
    origin = report.get("mlp_origin", {})
    if "skipped" in origin:
        lines.append(f"- origin at decoder layer {origin['layer']} not attributed: {origin['skipped']}")
    if "features" in origin:
        for feature, parts in origin["features"].items():
            lines.append(f"- origin of feature {feature} at decoder layer {origin['layer']} (sink tokens): layer input "
                         f"{parts['residual_in']['sink']:.1f}, attention output {parts['attention_out']['sink']:.1f}, "
                         f"MLP output {parts['mlp_out']['sink']:.1f}; top MLP units {parts['top_units']} with gate "
                         f"{_fmt(parts['gate']['sink'])} on sinks vs {_fmt(parts['gate']['other'])} elsewhere")
    cos = report["cos_to_bos"]
    middle = report.get("figure_entry", len(cos["non_sinks"]) // 2)
    if cos["intermediate_sinks"][middle] is not None:
        lines.append(f"- cos to BOS at entry {middle}: intermediate sinks {cos['intermediate_sinks'][middle]:.2f}, "
                     f"other tokens {cos['non_sinks'][middle]:.2f}")
    else:
        lines.append(f"- cos to BOS at entry {middle}: tokens {cos['non_sinks'][middle]:.2f}")
    if "eq10" in report:
        lines.append(f"- eq. 10's term (entries 2..L-1): {report['eq10']['term']:.3f}, of which the intermediate sinks "
                     f"make {100 * report['eq10']['share_from_intermediate_sinks']:.0f} %")
    if cos.get("non_sinks_without_massive"):
        lines.append(f"- other tokens at entry {middle}: cos {cos['non_sinks_pairwise'][middle]:.2f} to each other; "
                     f"{100 * cos['non_sinks_massive_share'][middle]:.0f} % of their squared norm in BOS's massive "
                     f"features {report['massive_features']}, without which their cos to BOS is "
                     f"{cos['non_sinks_without_massive'][middle]:.2f}")
    for effect in report.get("interventions", []):
        lines.append(f"- {effect['description']}, into layer {effect['layer']}:")
        for token, target, before, after in zip(effect["tokens"], effect["targets"], effect["before"],
                                                effect["after"]):
            lines.append(f"  - token {name(token)} toward {target}: sink layers {_ranges(before['sink_layers'])} -> "
                         f"{_ranges(after['sink_layers'])}; massive entries {_ranges(before['massive_entries'])} -> "
                         f"{_ranges(after['massive_entries'])}")
    if "figures" in report:
        lines += ["", "## Figures", ""] + [f"- {key}: `{Path(path).name}`" for key, path in report["figures"].items()]
    return "\n".join(lines) + "\n"


def _fmt(values):
    return "[" + ", ".join(f"{v:.1f}" for v in values if v is not None) + "]"


def _ranges(values) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    values = sorted(values)
    if not values:
        return "none"
    parts, start = [], values[0]
    for previous, current in zip(values, values[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            parts.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = current
    return ", ".join(parts)


# ---- command line ---------------------------------------------------------------------------------------------------


def add_analyze_arguments(parser):
    parser.add_argument("--model", required=True,
                        help="a saved LlamaAVSR folder, or any causal LM folder / offline name (e.g. smollm2-135m)")
    parser.add_argument("--data", help="LlamaAVSR models: the synthetic corpus directory, or the LRS2/LRS3 root")
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "lrs2", "lrs3"],
                        help="what --data holds (LRS2/LRS3 read by modeling_llama_avsr.data.load_lrs)")
    parser.add_argument("--layout", default="auto", choices=["auto", "auto_avsr", "raw"],
                        help="LRS2/LRS3 layout (see load_lrs)")
    parser.add_argument("--split", default=None,
                        help="split to probe (default: validation for the synthetic corpus, test for LRS2/LRS3)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples in the analysed batch (figures: first)")
    parser.add_argument("--text", default=None, help="text to analyse with a plain causal LM (BOS is prepended)")
    parser.add_argument("--out", required=True, help="output directory for report.json, summary.md and figures")
    parser.add_argument("--threshold", type=float, default=SINK_THRESHOLD,
                        help="sink: relative score (attention from queries far after the token, in units of uniform "
                             "causal attention) above this")
    parser.add_argument("--min-queries", type=int, default=SINK_MIN_QUERIES,
                        help="sink: at least this many queries far enough after the token")
    parser.add_argument("--tau", type=float, default=1000.0, help="massive: |H| >= tau * median(|H|) (eq. 6)")
    parser.add_argument("--no-interventions", action="store_true", help="skip the eq. 8/9 rotations")
    parser.add_argument("--eq8-toward", default="nearest", choices=["nearest", "most_similar"],
                        help="eq. 8's f(i): the nearest non-sink by position, or the most aligned by cosine")
    parser.add_argument("--figure-layer", type=int, default=None,
                        help="hidden-states entry for the 3D and pairwise-cosine figures (default: first massive)")


def _rows(args):
    """The first --num-samples rows of the chosen split, through the package's own loaders."""
    if args.dataset == "synthetic":
        from ..data import load_synthetic

        rows = load_synthetic(args.data, args.split or "validation")
    else:
        from ..data import load_lrs

        rows = load_lrs(args.data, dataset=args.dataset, split=args.split or "test", layout=args.layout)
    if len(rows) < args.num_samples:
        raise SystemExit(f"{args.data}: split {args.split!r} has {len(rows)} samples, fewer than --num-samples "
                         f"{args.num_samples}")
    return [rows[i] for i in range(args.num_samples)]


def load_for_analysis(args):
    """(model, inputs, types, token strings) for the command line: a LlamaAVSR folder with corpus (synthetic, LRS2 or
    LRS3) rows, or a causal LM with text."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..configuration_llama_avsr import LlamaAVSRConfig
    from ..configuration_llama_avsr import resolve_component
    from ..modeling_llama_avsr import LlamaAVSRForConditionalGeneration
    from .tokens import processor_token_types

    path = resolve_component(args.model)
    config = AutoConfig.from_pretrained(path)
    if config.model_type == LlamaAVSRConfig.model_type:
        from ..data.collator import AVSRDataCollator
        from ..processing_llama_avsr import LlamaAVSRProcessor

        if not args.data:
            raise SystemExit("A LlamaAVSR model needs --data (a synthetic corpus directory, or an LRS2/LRS3 root with "
                             "--dataset lrs2|lrs3)")
        model = LlamaAVSRForConditionalGeneration.from_pretrained(path).eval()
        processor = LlamaAVSRProcessor.from_pretrained(path)
        batch = AVSRDataCollator(processor)(_rows(args))
        types = processor_token_types(processor, batch)
        tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
        return model, dict(batch), types, tokens
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = args.text or DEFAULT_TEXT
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids  # the paper's layout always starts with BOS
    input_ids = torch.tensor([ids])
    types = torch.full_like(input_ids, PROMPT)
    types[0, 0] = BOS
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, types, \
        tokenizer.convert_ids_to_tokens(ids)


def run_analyze(args) -> int:
    model, inputs, types, tokens = load_for_analysis(args)
    report = analyze(model, inputs, types=types, out_dir=args.out, tokens=tokens, threshold=args.threshold,
                     tau=args.tau, interventions=not args.no_interventions, figure_layer=args.figure_layer,
                     min_queries=args.min_queries, eq8_toward=args.eq8_toward)
    print(summary_markdown(report), end="")
    return 0


__all__ = ["DEFAULT_TEXT", "add_analyze_arguments", "analyze", "load_for_analysis", "run_analyze", "summary_markdown"]
