"""The study behind `examples/reproduce_paper.py`: its grid, its statistics, its tables, the reading of each claim
and the figures (that script runs the cells; this module reads their result files).

    python examples/reproduction.py outputs/reproduce          # rewrite OUT/report/ from the finished cells

Everything is computed from the cells' result files. Statistics: mean +- sample standard deviation over seeds; a
difference is called only when it exceeds twice its standard error, sqrt(s1^2 / n1 + s2^2 / n2), with at least two
seeds on each side; otherwise it is "not separable from seed variance".
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

LAMBDAS = (10.0, 100.0, 10000.0)
BASE_SEEDS = (0, 1, 2)
# Settings whose spread is large at this scale (high compression) get more seeds for the base and the chosen lambda.
EXTRA_SEEDS = (3, 4)
HIGH_COMPRESSION = ("asr-16", "asr-32", "vsr-5", "avsr-16-5")
ACT_SETTINGS = ("asr-32", "avsr-16-5")
# Figures 1-4 analogues are drawn for seed 0 of every method at these settings.
FIGURE_SETTINGS = ("asr-32", "avsr-16-5")
# The sink monitor measures at these optimizer steps (0 = the composed pretrained model, before any update).
MONITOR_STEPS = (0, 25, 75, 150, 300, 450)


@dataclass(frozen=True)
class Setting:
    name: str
    modality: str
    audio_rate: int = 4
    video_rate: int = 2

    @property
    def label(self) -> str:
        rates = {"asr": (self.audio_rate,), "vsr": (self.video_rate,), "avsr": (self.audio_rate, self.video_rate)}
        return f"{self.modality.upper()} ({','.join(map(str, rates[self.modality]))})"


SETTINGS = {s.name: s for s in (
    Setting("asr-4", "asr", audio_rate=4),
    Setting("asr-16", "asr", audio_rate=16),
    Setting("asr-32", "asr", audio_rate=32),
    Setting("vsr-1", "vsr", video_rate=1),
    Setting("vsr-5", "vsr", video_rate=5),
    Setting("avsr-1-1", "avsr", audio_rate=1, video_rate=1),
    Setting("avsr-4-2", "avsr", audio_rate=4, video_rate=2),
    Setting("avsr-16-5", "avsr", audio_rate=16, video_rate=5),
)}
# The paper's Table 1 (Llama 3.2-3B on LRS2; VSR on LRS3): base -> decorrelation WER %.
PAPER_TABLE1 = {"asr-4": (2.62, 2.61), "asr-16": (4.83, 3.91), "asr-32": (12.92, 11.50), "vsr-1": (25.84, 25.63),
                "vsr-5": (45.19, 34.08), "avsr-1-1": (2.26, 2.22), "avsr-4-2": (2.44, 2.42),
                "avsr-16-5": (4.15, 3.72)}
PAPER_TABLE2 = {"asr-32": (12.92, 12.81, 11.50), "avsr-16-5": (4.15, 4.08, 3.72)}  # base, ACT, decorrelation


def method_name(weight: float) -> str:
    return "base" if weight == 0 else f"decor-{weight:g}"


def method_weight(method: str) -> float:
    return 0.0 if method == "base" else float(method.split("-", 1)[1])


# ---- aggregation ---------------------------------------------------------------------------------------------------


def load_results(*outs: Path) -> dict[str, dict]:
    """The result files of one or more grid folders, by cell name. Several folders make one study (e.g. grids run in
    different sessions on the same recipe); a cell found in two of them is an error, since the report cannot know
    which run to count (compare reruns with `rerun_rows` instead). A folder inside a grid's `runs/` (a setting's, a
    method's) stands for the cells under it: a study can take one setting of a grid and leave the rest (e.g. the video
    cells of an earlier lip encoder)."""
    results, where = {}, {}
    for out in outs:
        out = Path(out)
        found = out.glob("runs/*/*/*/result.json") if (out / "runs").is_dir() else out.rglob("result.json")
        for path in sorted(found):
            try:
                result = json.loads(path.read_text())
                cell = result["cell"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}: not a result file of reproduce_paper.py ({error}); delete it to rerun the "
                                 f"cell") from error
            if cell in results:
                raise ValueError(f"cell {cell} has two result files, {where[cell]} and {path}: give each study its "
                                 f"own folders (a rerun of a cell belongs in --reruns)")
            results[cell], where[cell] = result, path
    return results


def check_one_lip_encoder(results: dict) -> None:
    """Every comparison of the report is within a setting, so a setting's cells must share one lip encoder: a
    re-pretrained encoder alone moved VSR (5)'s seed-0 WER by 4 points (RESULTS.md). Cells that predate the
    fingerprint (`video_encoder` absent) count as one unknown encoder."""
    by_setting = {}
    for name, r in results.items():
        if SETTINGS[r["setting"]].modality == "asr":
            continue
        encoder = (r.get("video_encoder") or {}).get("sha256", "unrecorded")
        by_setting.setdefault(r["setting"], {}).setdefault(encoder, []).append(name)
    for setting, encoders in by_setting.items():
        if len(encoders) > 1:
            listing = "; ".join(f"{e[:12]}: {', '.join(sorted(cells)[:3])}{' ...' if len(cells) > 3 else ''}"
                                for e, cells in encoders.items())
            raise ValueError(f"{setting}: cells with different lip encoders ({listing}); report them as separate "
                             f"studies")


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": len(values)}


def metric(result: dict, split: str, condition: str = "clean", name: str = "wer"):
    block = result.get(split) or {}
    if split == "test":
        block = block.get(condition) or {}
    value = block.get(name)
    return None if value is None else float(value)


def collect(results, setting, method, split, condition="clean", name="wer"):
    return [metric(r, split, condition, name) for r in results.values()
            if r["setting"] == setting and r["method"] == method]


def choice_seeds(setting: str, results) -> list[int]:
    """The first-pass seeds (`BASE_SEEDS`) on which `choose_lambda` compares the paper's weights: those that every
    weight run at this setting has. A mean over three seeds against one seed's value would favour the noisier side
    (the lowest of noisy numbers is picked), so the weights are compared on the same seeds. Where they share none,
    each weight's own first-pass seeds are used (said by the empty list)."""
    seeds = [{r["seed"] for r in results.values()
              if r["setting"] == setting and r["method"] == method_name(w) and r["seed"] in BASE_SEEDS}
             for w in LAMBDAS]
    seeds = [s for s in seeds if s]
    return sorted(set.intersection(*seeds)) if seeds else []


def choose_lambda(setting: str, results) -> str | None:
    """The lambda of the paper's set (`LAMBDAS`) with the lowest mean validation WER over `choice_seeds` (ties: the
    lower validation CE). Weights outside the paper's set (e.g. `--lambdas 0.1 1`) never take part: they are
    reported beside it (`lambda_table`, `paired_lambda_table`), not chosen.

    Only `BASE_SEEDS` count: the extra seeds are run for the chosen lambda alone, and counting them could move the
    choice to a lambda with fewer seeds (whose extra seeds were never run)."""
    shared = set(choice_seeds(setting, results)) or set(BASE_SEEDS)
    first_pass = {k: r for k, r in results.items() if r["seed"] in shared}
    best = None
    for weight in LAMBDAS:
        method = method_name(weight)
        wer = mean_std(collect(first_pass, setting, method, "validation"))
        ce = mean_std(collect(first_pass, setting, method, "validation", name="ce_loss"))
        if wer is None:
            continue
        key = (wer["mean"], ce["mean"] if ce else float("inf"))
        if best is None or key < best[0]:
            best = (key, method)
    return None if best is None else best[1]


def chosen_label(setting: str, results, chosen: str | None) -> str:
    """`chosen` (`choose_lambda`'s method) for the tables; a choice among fewer than the paper's weights says so,
    because it is the best of those run, not the choice the paper's set would make."""
    if chosen is None:
        return "-"
    run = sum(bool(collect(results, setting, method_name(w), "validation")) for w in LAMBDAS)
    return chosen if run == len(LAMBDAS) else f"{chosen} (of {run} of {len(LAMBDAS)} weights run)"


def compare(a, b) -> dict | None:
    """b - a with its standard error; the verdict needs |difference| > 2 SE (and two seeds on each side)."""
    if a is None or b is None or a["n"] < 2 or b["n"] < 2:
        return None
    diff = b["mean"] - a["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"difference": diff, "se": se, "separable": abs(diff) > 2 * se}


def compare_paired(differences) -> dict | None:
    """The mean of per-seed differences (the same trained model measured two ways, e.g. decoded with and without ACT)
    with its standard error std / sqrt(n); the verdict needs |mean| > 2 SE and two pairs."""
    stat = mean_std(differences)
    if stat is None or stat["n"] < 2:
        return None
    se = stat["std"] / math.sqrt(stat["n"])
    return {"difference": stat["mean"], "se": se, "separable": abs(stat["mean"]) > 2 * se}


LOW_SEMANTIC = ("BOS", "audio marker", "video marker", "prompt")
NOISY = "babble 0 dB"


def fmt(stat, scale: float = 100.0, digits: int = 2, n: bool = True) -> str:
    if stat is None:
        return "-"
    std = "" if not math.isfinite(stat["std"]) else f" ± {scale * stat['std']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f}{std}" + (f" (n={stat['n']})" if n else "")


def verdict(comparison) -> str:
    """'lower' / 'higher' (the second against the first) when the difference exceeds 2 SE, else 'not separable from
    seed variance' ('too few seeds' without two seeds on each side)."""
    if comparison is None:
        return "too few seeds"
    if not comparison["separable"]:
        return "not separable from seed variance"
    lower = comparison["difference"] < 0
    return "lower" if lower else "higher"


def conditions(setting: Setting) -> list[str]:
    """The test conditions a setting is reported on: AVSR also at 0 dB babble, where the video matters."""
    return ["clean"] + ([NOISY] if setting.modality == "avsr" else [])


def row_label(setting: Setting, condition: str) -> str:
    return setting.label + ("" if condition == "clean" else f", {condition}")


def delta_with_2se(comparison) -> str:
    """A difference in WER points, +- twice its standard error."""
    return "-" if comparison is None else f"{100 * comparison['difference']:+.2f} ± {200 * comparison['se']:.2f}"


def runs(results, setting, method):
    return [r for r in results.values() if r["setting"] == setting and r["method"] == method]


def history_value(result, step, key):
    for entry in (result.get("sinks") or {}).get("history", []):
        if entry["step"] == step:
            return entry["profile"][key] if key in entry.get("profile", {}) else entry.get(key)
    return None


def final_profile(result):
    history = (result.get("sinks") or {}).get("history", [])
    return history[-1]["profile"] if history else None


# ---- tables --------------------------------------------------------------------------------------------------------


def table1(results) -> tuple[list[str], dict]:
    rows = ["| setting | base WER % | λ* (validation) | decorrelation WER % | Δ (decor - base) ± 2 SE | reading | "
            "test CE base / decor | paper base -> decor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    data = {}
    for name, setting in SETTINGS.items():
        chosen = choose_lambda(name, results)
        label = chosen_label(name, results, chosen)
        for condition in conditions(setting):
            base = mean_std(collect(results, name, "base", "test", condition))
            if base is None:
                continue
            decor = mean_std(collect(results, name, chosen, "test", condition)) if chosen else None
            ce_base = mean_std(collect(results, name, "base", "test", condition, "ce_loss"))
            ce_decor = mean_std(collect(results, name, chosen, "test", condition, "ce_loss")) if chosen else None
            comparison = compare(base, decor)
            data[(name, condition)] = {"base": base, "decor": decor, "lambda": chosen, "compare": comparison,
                                       "ce_base": ce_base, "ce_decor": ce_decor,
                                       "ce_compare": compare(ce_base, ce_decor)}
            paper = PAPER_TABLE1.get(name) if condition == "clean" else None
            rows.append(f"| {row_label(setting, condition)} | {fmt(base)} | {label} | "
                        f"{fmt(decor)} | {delta_with_2se(comparison)} | "
                        f"{verdict(comparison)} | {fmt(ce_base, 1, 3, False)} / {fmt(ce_decor, 1, 3, False)} | "
                        f"{f'{paper[0]} -> {paper[1]}' if paper else ''} |")
    return rows, data


def weights_run(results) -> list[float]:
    """Every decorrelation weight with a result (the paper's set and any other), ascending, base (0) first."""
    return sorted({0.0, *(float(r["lambda"]) for r in results.values())})


def weight_label(weight: float) -> str:
    return f"λ = {weight:g}" + ("" if weight == 0 or weight in LAMBDAS else " (not the paper's)")


def lambda_table(results) -> list[str]:
    weights = weights_run(results)
    rows = ["| setting | " + " | ".join(weight_label(w) for w in weights) + " | chosen (paper's set) | chosen on seeds |",
            "| --- |" + " --- |" * (len(weights) + 2)]
    for name, setting in SETTINGS.items():
        cells = [fmt(mean_std(collect(results, name, method_name(w), "validation")), n=True) for w in weights]
        if all(c == "-" for c in cells):
            continue
        seeds = ", ".join(map(str, choice_seeds(name, results))) or "each λ's own"
        label = chosen_label(name, results, choose_lambda(name, results))
        rows.append(f"| {setting.label} | " + " | ".join(cells) + f" | {label} | {seeds} |")
    return rows


def paired_lambda_table(results) -> tuple[list[str], dict]:
    """Test WER at every weight run, and its difference to the base model of the same seed (same initialisation and
    data order), mean over the seeds both have, +- 2 SE (`compare_paired`). The paired view is the sharper one where
    a weight has few seeds; it is how a weight outside the paper's set is compared."""
    weights = [w for w in weights_run(results) if w > 0]
    rows = ["| setting | " + " | ".join(weight_label(w) + ": WER %, Δ paired ± 2 SE" for w in weights) + " |",
            "| --- |" + " --- |" * len(weights)]
    data = {}
    for name, setting in SETTINGS.items():
        for condition in conditions(setting):
            base = {r["seed"]: metric(r, "test", condition) for r in runs(results, name, "base")}
            cells, any_run = [], False
            for weight in weights:
                decor = {r["seed"]: metric(r, "test", condition) for r in runs(results, name, method_name(weight))}
                pairs = [decor[k] - base[k] for k in sorted(decor) if k in base and None not in (decor[k], base[k])]
                paired = compare_paired(pairs)
                stat = mean_std(list(decor.values()))
                any_run = any_run or stat is not None
                data[(name, condition, weight)] = {"wer": stat, "pairs": len(pairs), "paired": paired}
                if stat is None:
                    cells.append("-")
                elif paired is None:
                    cells.append(f"{fmt(stat)}" + (f", Δ {100 * pairs[0]:+.2f} (1 pair)" if len(pairs) == 1 else ""))
                else:
                    cells.append(f"{fmt(stat)}, Δ {delta_with_2se(paired)} ({verdict(paired)})")
            if any_run:
                rows.append(f"| {row_label(setting, condition)} | " + " | ".join(cells) + " |")
    return rows, data


def dose_settings(results) -> list[str]:
    """The settings run at more than one decorrelation weight: those with a dose-response to show."""
    return [n for n in SETTINGS
            if len([w for w in weights_run(results) if w > 0 and runs(results, n, method_name(w))]) > 1]


def dose_rows(results) -> list[str]:
    """What each weight does, for settings run at more than one weight (the dose-response): test WER and CE, the
    decorrelation term on the test split (eq. 10, measured for the base too), and the sinks at the end of training
    (intermediate sinks per probe sample, cos to BOS of sinks / other tokens, the largest massive ratio); mean +-
    std over seeds."""
    rows = ["| setting | λ | n | test WER % | test CE | test eq. 10 term | intermediate sinks / sample (end) | "
            "cos to BOS: sinks / others (end) | max massive ratio (end) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in dose_settings(results):
        setting = SETTINGS[name]
        for weight in [w for w in weights_run(results) if runs(results, name, method_name(w))]:
            group = runs(results, name, method_name(weight))
            ends = [final_profile(r) for r in group if final_profile(r)]
            stat = lambda values, scale=1.0, digits=2: fmt(mean_std(values), scale, digits, False)  # noqa: E731
            rows.append(
                f"| {setting.label} | {weight:g} | {len(group)} | {stat([metric(r, 'test') for r in group], 100)} | "
                f"{stat([metric(r, 'test', name='ce_loss') for r in group], 1, 3)} | "
                f"{stat([metric(r, 'test', name='decor_loss') for r in group], 1, 3)} | "
                f"{stat([e['intermediate_positions'] for e in ends])} | "
                f"{stat([e['cos_bos']['sinks'] for e in ends])} / {stat([e['cos_bos']['others'] for e in ends])} | "
                f"{stat([e['massive']['max_ratio'] for e in ends], 1, 0)} |")
    return rows if len(rows) > 2 else []


def rerun_rows(results, reruns) -> list[str]:
    """Cells run again independently (another session, machine or lip-encoder pretraining) against the study's own
    run of the same cell: test WER and CE of both, and the difference set against the seed spread of that setting and
    method in the study (the std over its seeds). A rerun is consistent with the table where the difference is within
    about two of those stds."""
    rows = ["| cell | study: WER % (CE), device | rerun: WER % (CE), device | rerun - study, WER points | "
            "seed std of the study's setting and method |", "| --- | --- | --- | --- | --- |"]
    for name, rerun in sorted(reruns.items()):
        original = results.get(name)
        if original is None:
            continue
        for condition in conditions(SETTINGS[rerun["setting"]]):
            a, b = metric(original, "test", condition), metric(rerun, "test", condition)
            if a is None or b is None:
                continue
            spread = mean_std(collect(results, rerun["setting"], rerun["method"], "test", condition))
            std = f"{100 * spread['std']:.2f} (n={spread['n']})" if spread and math.isfinite(spread["std"]) else "-"
            label = name + ("" if condition == "clean" else f", {condition}")
            ce_a, ce_b = metric(original, "test", condition, "ce_loss"), metric(rerun, "test", condition, "ce_loss")
            rows.append(f"| {label} | {100 * a:.2f} ({ce_a:.3f}), {original.get('device', '?')} | "
                        f"{100 * b:.2f} ({ce_b:.3f}), {rerun.get('device', '?')} | {100 * (b - a):+.2f} | {std} |")
    return rows if len(rows) > 2 else []


def table2(results, t1) -> tuple[list[str], dict]:
    rows = ["| setting | base WER % | ACT WER % | decorrelation WER % | ACT - base ± 2 SE | ACT - base, paired ± 2 SE | "
            "max ratio base / ACT | paper base, ACT, decor |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    data = {}
    for name in ACT_SETTINGS:
        setting = SETTINGS[name]
        for condition in conditions(setting):
            base_runs = [r for r in runs(results, name, "base") if r.get("act")]
            if not base_runs:
                continue
            base = mean_std([r["test"][condition]["wer"] for r in base_runs])
            act = mean_std([r["act"]["test"][condition]["wer"] for r in base_runs])
            decor = (t1.get((name, condition)) or {}).get("decor")
            ratio_base = mean_std([final_profile(r)["massive"]["max_ratio"] for r in base_runs if final_profile(r)])
            ratio_act = mean_std([r["act"]["sinks"]["profile"]["massive"]["max_ratio"] for r in base_runs])
            comparison = compare(base, act)
            # ACT decodes the base model itself: each seed's difference is a pair, free of the seeds' spread.
            paired = compare_paired([r["act"]["test"][condition]["wer"] - r["test"][condition]["wer"]
                                     for r in base_runs])
            data[(name, condition)] = {"base": base, "act": act, "decor": decor, "compare": comparison,
                                       "paired": paired,
                                       "ratio_base": ratio_base, "ratio_act": ratio_act,
                                       "heads": [len(r["act"]["search"]["heads"]) for r in base_runs]}
            paper = PAPER_TABLE2.get(name) if condition == "clean" else None
            rows.append(f"| {row_label(setting, condition)} | {fmt(base)} | {fmt(act)} | {fmt(decor)} | "
                        f"{delta_with_2se(comparison)} | {delta_with_2se(paired)} | "
                        f"{fmt(ratio_base, 1, 0, False)} / {fmt(ratio_act, 1, 0, False)} | "
                        f"{', '.join(map(str, paper)) if paper else ''} |")
    return rows, data


def sink_timing_note(results) -> list[str]:
    """Say when "end" was measured: the monitor's last step, which is the end of training only for runs no longer
    than the last of `MONITOR_STEPS` (or run since the monitor also measures when training ends)."""
    last = sorted({r["sinks"]["history"][-1]["step"] for r in results.values() if (r.get("sinks") or {}).get("history")})
    epochs = sorted({r["test"]["clean"]["epoch"] for r in results.values() if "epoch" in r.get("test", {}).get("clean", {})})
    trained = sorted({r["trained_steps"] for r in results.values() if "trained_steps" in r})
    if not last:
        return []
    note = f"'end' is each run's last sink measurement: step {', '.join(map(str, last))}"
    if epochs:
        note += f"; the runs trained for {', '.join(f'{e:g}' for e in epochs)} epoch(s)"
    if trained:
        note += f" ({', '.join(map(str, trained))} steps)"
    elif max(last) == MONITOR_STEPS[-1] and epochs and max(epochs) > 3:
        note += (f", longer than the monitor's last step {MONITOR_STEPS[-1]}: these runs predate the measurement at the "
                 f"end of training, so their sink columns describe the model at step {MONITOR_STEPS[-1]}, their WER "
                 f"and CE the trained one")
    return [note + ".", ""]


def sink_table(results) -> tuple[list[str], dict]:
    rows = ["| setting | method | intermediate sinks / sample, step 0 -> end | on low-semantic tokens (end) | "
            "BOS-sink share of layers (end) | max massive ratio (end) | cos to BOS: sinks / others (end) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    data = {}
    for name, setting in SETTINGS.items():
        chosen = choose_lambda(name, results)
        for method in ("base", chosen):
            group = [r for r in runs(results, name, method) if final_profile(r)] if method else []
            if not group:
                continue
            start = mean_std([history_value(r, 0, "intermediate_positions") for r in group])
            end = mean_std([final_profile(r)["intermediate_positions"] for r in group])
            low = []
            for r in group:
                by_type = final_profile(r)["intermediate_by_type"]
                total = sum(by_type.values())
                if total:
                    low.append(sum(v for k, v in by_type.items() if k in LOW_SEMANTIC) / total)
            low = mean_std(low)
            bos = mean_std([final_profile(r)["bos_sink_fraction"] for r in group])
            ratio = mean_std([final_profile(r)["massive"]["max_ratio"] for r in group])
            cos_s = mean_std([final_profile(r)["cos_bos"]["sinks"] for r in group])
            cos_o = mean_std([final_profile(r)["cos_bos"]["others"] for r in group])
            data[(name, method)] = {"start": start, "end": end, "low": low, "bos": bos, "ratio": ratio,
                                    "cos_sinks": cos_s, "cos_others": cos_o, "n": len(group)}
            rows.append(f"| {setting.label} | {method} | {fmt(start, 1, 2, False)} -> {fmt(end, 1, 2)} | "
                        f"{fmt(low, 100, 0, False)} % | {fmt(bos, 100, 0, False)} % | {fmt(ratio, 1, 0, False)} | "
                        f"{fmt(cos_s, 1, 2, False)} / {fmt(cos_o, 1, 2, False)} |")
    return rows, data


def trained_model_rows(results) -> list[str]:
    """The trained model itself (after the test decoding, `analyze` on the probe's sample 0): a cross-check of the
    monitor's last step, and the only end-of-training sink measurement of runs longer than `MONITOR_STEPS`."""
    rows = ["| setting | method | runs whose sample 0 has an intermediate sink | BOS-sink layers (of L) | "
            "max massive ratio |", "| --- | --- | --- | --- | --- |"]
    for name, setting in SETTINGS.items():
        for method in ("base", choose_lambda(name, results)):
            group = [r["sinks"]["final"] for r in runs(results, name, method) if (r.get("sinks") or {}).get("final")] \
                if method else []
            if not group:
                continue
            with_sink = sum(bool(f["intermediate_sinks"]) for f in group)
            bos = mean_std([len(f["bos_sink_layers"]) for f in group])
            ratio = mean_std([f["max_ratio"] for f in group])
            rows.append(f"| {setting.label} | {method} | {with_sink} of {len(group)} | {fmt(bos, 1, 1, False)} "
                        f"(of {group[0]['num_layers']}) | {fmt(ratio, 1, 0, False)} |")
    return rows if len(rows) > 2 else []


# ---- the reading ---------------------------------------------------------------------------------------------------


def _share(flags):
    flags = [f for f in flags if f is not None]
    return (sum(flags), len(flags))


def readings(results, t1, t2, sinks) -> list[tuple[str, str, str]]:
    """(claim, verdict, numbers) for claims (a)-(h) of issue 15."""
    out = []
    everything = list(results.values())
    base_runs = [r for r in everything if r["method"] == "base" and final_profile(r)]

    # (a) BOS sink in the pretrained LLM: the composed model before any update (step 0).
    start = [history_value(r, 0, "bos_sink_fraction") for r in everything]
    start = mean_std(start)
    out.append(("(a) a BOS sink is present in the pretrained LLM",
                "holds" if start and start["mean"] > 0.3 else ("does not hold" if start else "not measured"),
                f"before fine-tuning the BOS is a sink in {fmt(start, 100, 0, False)} % of layers 2..L-1 "
                f"(all {start['n'] if start else 0} runs, step 0)"))

    # (b) intermediate sinks emerge in fine-tuning, on low-semantic tokens (base runs).
    deltas = [final_profile(r)["intermediate_positions"] - (history_value(r, 0, "intermediate_positions") or 0)
              for r in base_runs]
    change = mean_std(deltas)
    emerged = change is not None and change["n"] > 1 and change["mean"] > 2 * change["std"] / math.sqrt(change["n"])
    low = []
    for r in base_runs:
        by_type = final_profile(r)["intermediate_by_type"]
        if sum(by_type.values()):
            low.append(sum(v for k, v in by_type.items() if k in LOW_SEMANTIC) / sum(by_type.values()))
    low = mean_std(low)
    start0 = mean_std([history_value(r, 0, "intermediate_positions") for r in base_runs])
    end0 = mean_std([final_profile(r)["intermediate_positions"] for r in base_runs])
    out.append(("(b) intermediate sinks emerge during fine-tuning, on low-semantic tokens",
                ("holds" if emerged and low and low["mean"] > 0.5 else
                 # sinks that clearly emerged, but mostly on content tokens, fail the claim's second half
                 "does not hold" if (change and change["mean"] <= 0) or emerged else
                 "not separable from seed variance"),
                f"base runs: {fmt(start0, 1, 2, False)} intermediate sinks per sample before fine-tuning, "
                f"{fmt(end0, 1, 2, False)} after (change {fmt(change, 1, 2)}); "
                f"{fmt(low, 100, 0, False)} % of the final ones on BOS-like / marker / prompt tokens"))

    # (c) massive features shared with BOS, made by the MLP (gate positive on sinks, negative elsewhere).
    shared, mlp, gate = [], [], []
    for r in base_runs:
        massive = final_profile(r)["massive"]
        if massive["features_sinks"]:
            bos_set, sink_set = set(massive["features_bos"]), set(massive["features_sinks"])
            shared.append(len(bos_set & sink_set) / len(bos_set | sink_set))
        origin = r["sinks"]["final"].get("mlp_origin") or {}
        for feature in (origin.get("features") or {}).values():
            mlp.append(abs(feature["mlp_out"]["sink"]) > max(abs(feature["residual_in"]["sink"]),
                                                             abs(feature["attention_out"]["sink"])))
            g_sink, g_other = feature["gate"]["sink"][0], feature["gate"]["other"][0]
            if g_sink is not None and g_other is not None:
                gate.append(g_sink > 0 > g_other)
    jaccard = mean_std(shared)
    mlp_hits, gate_hits = _share(mlp), _share(gate)
    if jaccard is None:
        verdict_c = "not observed: no intermediate sink carried a massive activation"
    elif not mlp_hits[1]:
        verdict_c = "not measured: no run traced a massive feature to its layer"
    elif jaccard["mean"] > 0.5 and mlp_hits[0] > mlp_hits[1] / 2:
        verdict_c = "holds"
    else:
        verdict_c = "does not hold"
    out.append(("(c) sinks' massive activations share BOS's feature indices and come from the MLP", verdict_c,
                f"Jaccard overlap of the massive features of BOS and of intermediate sinks {fmt(jaccard, 1, 2)} "
                f"(runs whose sinks carry massive features); the MLP writes the largest part of the first massive "
                f"features in {mlp_hits[0]} of {mlp_hits[1]} (run, feature) cases; its top unit's gate is positive "
                f"on sinks and negative elsewhere in {gate_hits[0]} of {gate_hits[1]}"))

    # (d) sinks have cos ~ 1 with BOS, others not.
    cos_s = mean_std([final_profile(r)["cos_bos"]["sinks"] for r in base_runs])
    cos_o = mean_std([final_profile(r)["cos_bos"]["others"] for r in base_runs])
    # "~ 1" for sinks: above 0.8; "not" for the others: separably below the sinks (beyond twice the standard error
    # of the difference) and not ~ 1 themselves. (A fixed "others < 0.5" read 0.50 +- 0.03 as "does not hold".)
    gap = compare(cos_o, cos_s) if cos_s and cos_o else None  # sinks - others
    holds_d = bool(cos_s and cos_o and gap and cos_s["mean"] > 0.8 and cos_o["mean"] <= 0.8
                   and gap["separable"] and gap["difference"] > 0)
    out.append(("(d) sinks have cos ~ 1 with BOS, other tokens not",
                "holds" if holds_d else ("not measured" if not cos_s else "does not hold"),
                f"cos to BOS in layers 2..L-1: intermediate sinks {fmt(cos_s, 1, 2)}, other tokens {fmt(cos_o, 1, 2)} "
                f"(base runs, after fine-tuning)"
                + (f"; sinks - others {gap['difference']:+.2f} ± {2 * gap['se']:.2f} (2 SE)" if gap else "")))

    # (e) eq. 8 removes a sink and its massive activations, eq. 9 creates one.
    removed, created = [], []
    for r in base_runs:
        for effect in r["sinks"]["final"].get("interventions") or []:
            layer = effect["layer"]
            for before, after in zip(effect["before"], effect["after"]):
                sink_before = [l for l in before["sink_layers"] if l >= layer]
                sink_after = [l for l in after["sink_layers"] if l >= layer]
                massive_before = [e for e in before["massive_entries"] if e > layer]
                massive_after = [e for e in after["massive_entries"] if e > layer]
                if effect["toward"] != "bos" and sink_before:
                    removed.append(len(sink_after) < len(sink_before) / 2 and len(massive_after) <= len(massive_before) / 2)
                elif effect["toward"] == "bos":
                    created.append(len(sink_after) > len(sink_before))
    removed, created = _share(removed), _share(created)

    def part(hits, total):
        return "not measured" if not total else ("holds" if hits > total / 2 else "does not hold")

    out.append(("(e) eq. 8 removes a sink and its massive activations, eq. 9 creates one",
                f"eq. 8: {part(*removed)}; eq. 9: {part(*created)}",
                f"eq. 8 halved a sink's sink layers and massive entries in {removed[0]} of {removed[1]} base runs with "
                f"an intermediate sink; eq. 9 made a token a sink in more layers in {created[0]} of {created[1]}"))

    # (f) decorrelation removes intermediate sinks and massive activations.
    lines, calls = [], []
    for name in SETTINGS:
        base, decor = sinks.get((name, "base")), None
        chosen = choose_lambda(name, results)
        if chosen:
            decor = sinks.get((name, chosen))
        if not base or not decor:
            continue
        c_sinks, c_ratio = compare(base["end"], decor["end"]), compare(base["ratio"], decor["ratio"])
        calls.append((c_sinks, c_ratio))
        lines.append(f"{SETTINGS[name].label}: sinks {fmt(base['end'], 1, 2, False)} -> {fmt(decor['end'], 1, 2, False)} "
                     f"({verdict(c_sinks)}), max ratio {fmt(base['ratio'], 1, 0, False)} -> "
                     f"{fmt(decor['ratio'], 1, 0, False)} ({verdict(c_ratio)})")
    fewer = sum(1 for s, r in calls if s and s["separable"] and s["difference"] < 0)
    lower_ratio = sum(1 for s, r in calls if r and r["separable"] and r["difference"] < 0)
    compared = [c for pair in calls for c in pair if c is not None]
    out.append(("(f) decorrelation removes intermediate sinks and massive activations",
                "not measured" if not calls else
                "too few seeds" if not compared else
                "holds" if fewer == len(calls) and lower_ratio == len(calls) else
                f"partly: fewer sinks in {fewer} of {len(calls)} settings, lower ratio in {lower_ratio}"
                if fewer + lower_ratio else
                "does not hold" if any(c["separable"] for c in compared) else "not separable from seed variance",
                "; ".join(lines)))

    # (g) WER lower at high compression, neutral at low.
    high, low_rates = [], []
    for (name, condition), row in t1.items():
        if condition != "clean" or row["compare"] is None:
            continue
        (high if name in HIGH_COMPRESSION else low_rates).append((name, row["compare"]))
    better = [n for n, c in high if c["separable"] and c["difference"] < 0]
    worse = [n for n, c in high + low_rates if c["separable"] and c["difference"] > 0]
    neutral = [n for n, c in low_rates if not c["separable"]]
    out.append(("(g) decorrelation lowers WER at high compression and is neutral at low",
                ("too few seeds" if not high else
                 "holds" if len(better) == len(high) and len(neutral) == len(low_rates) else
                 "not separable from seed variance" if high and not better and not worse else
                 "does not hold" if worse or (high and not better) else "partly"),
                (f"high compression ({', '.join(SETTINGS[n].label for n, _ in high)}): lower in "
                 f"{len(better)} of {len(high)} ({', '.join(SETTINGS[n].label for n in better) or 'none'}); "
                 f"low compression: not separable in {len(neutral)} of {len(low_rates)}; higher anywhere: "
                 f"{', '.join(SETTINGS[n].label for n in worse) or 'none'}") if high or low_rates else
                "no setting has two or more seeds of both; the single runs, base -> decorrelation: " + "; ".join(
                    f"{SETTINGS[n].label} {100 * row['base']['mean']:.2f} -> {100 * row['decor']['mean']:.2f} % "
                    f"(n={row['base']['n']}, {row['decor']['n']})"
                    for (n, condition), row in t1.items()
                    if condition == "clean" and row["base"] and row["decor"])))

    # (h) ACT gains less than decorrelation and leaves massive activations in place.
    parts, gains_less, massive_kept = [], [], []
    for (name, condition), row in t2.items():
        if condition != "clean":
            continue
        decor = row["decor"]
        act_decor = compare(decor, row["act"]) if row["act"] and decor else None  # ACT - decorrelation
        if row["act"] and decor:
            gains_less.append(act_decor)
        if row["ratio_act"] and row["ratio_base"]:
            massive_kept.append(row["ratio_act"]["mean"] > 0.5 * row["ratio_base"]["mean"])
        paired = row["paired"]
        parts.append(f"{SETTINGS[name].label}: ACT - base {fmt(row['compare'] and {'mean': row['compare']['difference'], 'std': float('nan'), 'n': 0}, 100, 2, False)} "
                     f"({verdict(row['compare'])}; paired over seeds {delta_with_2se(paired)}, {verdict(paired)}), "
                     f"max ratio {fmt(row['ratio_base'], 1, 0, False)} -> "
                     f"{fmt(row['ratio_act'], 1, 0, False)}, ACT - decorrelation ({verdict(act_decor)})")
    # ACT against decorrelation follows the 2-SE rule too: ACT's WER must be separably above decorrelation's.
    act_lower = any(c and c["separable"] and c["difference"] < 0 for c in gains_less)
    out.append(("(h) ACT gains less than decorrelation and leaves massive activations in place",
                ("not measured" if not gains_less or not massive_kept else
                 "does not hold" if act_lower or not all(massive_kept) else
                 "too few seeds" if any(c is None for c in gains_less) else
                 "holds" if all(c["separable"] for c in gains_less) else "not separable from seed variance"),
                "; ".join(parts)))
    return out


# ---- figures -------------------------------------------------------------------------------------------------------


def plot_emergence(results, path: Path):
    """Intermediate sinks per probe sample over training steps, base vs the chosen lambda, one panel per setting."""
    from modeling_llama_avsr.analysis.plots import _pyplot

    plt = _pyplot()
    names = [n for n in SETTINGS if runs(results, n, "base")]
    if not names:
        return None
    cols = min(4, len(names))
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.6 * cols, 2.8 * ((len(names) + cols - 1) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        for method, color in (("base", "tab:red"), (choose_lambda(name, results), "tab:blue")):
            if method is None:
                continue
            group = [r for r in runs(results, name, method) if (r.get("sinks") or {}).get("history")]
            steps = sorted({e["step"] for r in group for e in r["sinks"]["history"]})
            stats = [mean_std([history_value(r, s, "intermediate_positions") for r in group]) for s in steps]
            means = [s["mean"] if s else float("nan") for s in stats]
            stds = [s["std"] if s and math.isfinite(s["std"]) else 0.0 for s in stats]
            ax.plot(steps, means, color=color, marker="o", ms=3, label=f"{method} (n={len(group)})")
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.15)
        ax.set_title(SETTINGS[name].label, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_ylabel("intermediate sinks / sample", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Emergence of intermediate sinks during fine-tuning (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_table1(t1, path: Path):
    from modeling_llama_avsr.analysis.plots import _pyplot

    plt = _pyplot()
    keys = [k for k in t1 if t1[k]["decor"] is not None]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(keys) + 2, 3.4))
    xs = range(len(keys))
    for offset, field, color in ((-0.2, "base", "tab:red"), (0.2, "decor", "tab:blue")):
        means = [100 * t1[k][field]["mean"] for k in keys]
        # No error bar where one seed gives no spread (a zero-width bar would claim none).
        errs = [100 * t1[k][field]["std"] if math.isfinite(t1[k][field]["std"]) else math.nan for k in keys]
        bars = ax.bar([x + offset for x in xs], means, 0.4, yerr=errs, color=color, capsize=2,
                      label="base" if field == "base" else "decorrelation (λ*)")
        ax.bar_label(bars, [f"n={t1[k][field]['n']}" for k in keys], fontsize=6)
    ax.set_xticks(list(xs), [SETTINGS[n].label + ("" if c == "clean" else "\n0 dB") for n, c in keys], fontsize=7)
    ax.set_ylabel("test WER % (mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dose(results, path: Path):
    """For each setting run at more than one decorrelation weight: (left) test WER against λ, (right) what the loss
    changed at the end of training: intermediate sinks per sample and the other tokens' cos to BOS. Mean ± std over
    seeds; λ on a symmetric-log axis so that the base (λ = 0) sits at the left."""
    from modeling_llama_avsr.analysis.plots import _pyplot

    names = dose_settings(results)
    if not names:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for index, name in enumerate(names):
        color = f"C{index}"  # one colour per setting in both panels
        weights = [w for w in weights_run(results) if runs(results, name, method_name(w))]
        groups = [runs(results, name, method_name(w)) for w in weights]

        def series(values_of):
            stats = [mean_std(values_of(g)) for g in groups]
            return ([s["mean"] if s else math.nan for s in stats],
                    [s["std"] if s and math.isfinite(s["std"]) else 0.0 for s in stats])

        wer, wer_std = series(lambda g: [100 * metric(r, "test") for r in g])
        left.errorbar(weights, wer, yerr=wer_std, marker="o", capsize=3, color=color, label=SETTINGS[name].label)
        sinks, sinks_std = series(lambda g: [final_profile(r)["intermediate_positions"] for r in g if final_profile(r)])
        cos, cos_std = series(lambda g: [final_profile(r)["cos_bos"]["others"] for r in g if final_profile(r)])
        right.errorbar(weights, sinks, yerr=sinks_std, marker="o", capsize=3, color=color,
                       label=f"{SETTINGS[name].label}: intermediate sinks / sample")
        right.errorbar(weights, cos, yerr=cos_std, marker="s", ls="--", capsize=3, color=color,
                       label=f"{SETTINGS[name].label}: other tokens' cos to BOS")
    for ax, label in ((left, "test WER % (mean ± std)"), (right, "end of training")):
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("decorrelation weight λ (0 = base)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("What each λ does (the paper's set is 10, 1e2, 1e4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the whole report ----------------------------------------------------------------------------------------------


def write_report(results: dict, out_dir: Path, reruns: dict | None = None) -> Path:
    """tables.md, grid.json and the figures of the finished cells in `results`; `reruns` (cells run again
    independently, by name) are set against them in a table of their own and counted nowhere else."""
    check_one_lip_encoder(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    t1_rows, t1 = table1(results)
    t2_rows, t2 = table2(results, t1)
    sink_rows, sinks = sink_table(results)
    reading = readings(results, t1, t2, sinks)
    paired_rows, paired = paired_lambda_table(results)
    doses = dose_rows(results)
    figures = [p for p in (plot_table1(t1, out_dir / "table1.png"), plot_emergence(results, out_dir / "emergence.png"),
                           plot_dose(results, out_dir / "dose.png")) if p]
    devices = sorted({r.get("device", "?") for r in results.values()})
    lines = [f"{len(results)} runs finished ({', '.join(devices)}).", "",
             "Table 1 analogue: test WER, base vs decorrelation at the λ chosen on validation", "", *t1_rows, "",
             "λ chosen on the validation split (WER %, mean ± std)", "", *lambda_table(results), "",
             "Every λ run against the base model of the same seed (test WER %; Δ = λ - base, paired over seeds)", "",
             *paired_rows, "",
             *(["What each λ does where several were run (mean ± std over seeds)", "", *doses, ""] if doses else []),
             "Table 2 analogue: ACT (heads chosen on validation) on the base models", "", *t2_rows, "",
             "Sinks, measured on 8 validation utterances per run (layers 2..L-1)", "", *sink_rows, "",
             *sink_timing_note(results),
             "The trained models, after the test decoding (`analyze` on the probe's sample 0)", "",
             *trained_model_rows(results), "",
             "The reading", ""]
    lines += [f"- **{claim}**: {v}. {numbers}." for claim, v, numbers in reading]
    rerun_table = rerun_rows(results, reruns or {})
    if rerun_table:
        lines += ["", "Cells rerun independently, against the study's run of the same cell", "", *rerun_table]
    lines += ["", "Figures: " + ", ".join(p.name for p in figures)]
    text = "\n".join(lines) + "\n"
    (out_dir / "tables.md").write_text(text)
    serial = {"table1": {f"{k[0]}|{k[1]}": v for k, v in t1.items()}, "table2": {f"{k[0]}|{k[1]}": v for k, v in t2.items()},
              "sinks": {f"{k[0]}|{k[1]}": v for k, v in sinks.items()},
              "paired_lambdas": {f"{k[0]}|{k[1]}|{k[2]:g}": v for k, v in paired.items()},
              "reading": [{"claim": c, "verdict": v, "numbers": n} for c, v, n in reading]}
    (out_dir / "grid.json").write_text(json.dumps(serial, indent=1, default=str))
    return out_dir / "tables.md"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/reproduce")
    print(write_report(load_results(out), out / "report"))
