"""examples/reproduce_paper.py (the grid of run_avsr.py cells) and examples/reproduction.py (its tables, readings and
figures), without training anything: the cells' result files are built here, shaped like the ones the runner writes
(tests/data/reproduction/asr-32_base_seed0.json is a real one, from the GPU grid), with numbers whose statistics are
worked out by hand in each test."""

import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import reproduce_paper  # noqa: E402
import reproduction  # noqa: E402
from reproduce_paper import Cell  # noqa: E402

REAL_RESULT = Path(__file__).parent / "data" / "reproduction" / "asr-32_base_seed0.json"
ALL_SETTINGS = ["asr-4", "asr-16", "asr-32", "vsr-1", "vsr-5", "avsr-1-1", "avsr-4-2", "avsr-16-5"]
METHODS = ["base", "decor-10", "decor-100", "decor-10000"]  # the paper's lambdas 10, 1e2, 1e4, written out


# ---- result files, as reproduce_paper.run_cell writes them -----------------------------------------------------------


def profile(sinks=0.0, by_type=None, bos=0.8, ratio=1000.0, cos_sinks=None, cos_others=0.3):
    """A sink profile (SinkMonitorCallback's `profile`), with only the keys the report reads."""
    return {"layers": [2, 29], "bos_sink_fraction": bos, "intermediate_positions": sinks,
            "intermediate_by_type": by_type if by_type is not None else ({"prompt": sinks} if sinks else {}),
            "massive": {"max_ratio": ratio, "features_bos": [507], "features_sinks": [], "features_others": []},
            "cos_bos": {"sinks": cos_sinks, "others": cos_others}}


def result(setting, method, seed, val_wer=0.3, val_ce=0.5, test_wer=0.3, test_ce=0.5, noisy_wer=None,
           start=None, end=None, act=None):
    """One cell's result.json; `start` / `end` are the sink profiles at step 0 and after training."""
    out = {"cell": f"{setting}/{method}/seed{seed}", "setting": setting, "method": method,
           "lambda": 0.0 if method == "base" else float(method.split("-")[1]), "seed": seed,
           "command": "python examples/run_avsr.py ...", "device": "cpu",
           "validation": {"wer": val_wer, "ce_loss": val_ce},
           "test": {"clean": {"wer": test_wer, "ce_loss": test_ce}}}
    if noisy_wer is not None:
        out["test"]["babble 0 dB"] = {"wer": noisy_wer, "ce_loss": test_ce}
    if start is not None:
        out["sinks"] = {"history": [{"step": 0, "profile": start}, {"step": 450, "profile": end}],
                        "final": {"mlp_origin": {}, "interventions": []}}
    if act is not None:
        out["act"] = act
    return out


def by_cell(*results):
    return {r["cell"]: r for r in results}


def report_parts(results):
    t1_rows, t1 = reproduction.table1(results)
    t2_rows, t2 = reproduction.table2(results, t1)
    sink_rows, sinks = reproduction.sink_table(results)
    reading = {claim[:3]: (v, numbers) for claim, v, numbers in reproduction.readings(results, t1, t2, sinks)}
    return t1_rows, t1, t2_rows, sink_rows, reading


def table_row(rows, label):
    [row] = [r for r in rows if r.startswith(f"| {label} |")]
    return [c.strip() for c in row.strip("|").split("|")][1:]  # the cells after the label


# ---- the grid ------------------------------------------------------------------------------------------------------


def test_first_pass_cells_are_seed_major_and_cover_settings_methods_seeds():
    cells = reproduce_paper.first_pass_cells(ALL_SETTINGS)
    names = [c.name for c in cells]
    expected = {f"{s}/{m}/seed{k}" for s in ALL_SETTINGS for m in METHODS for k in (0, 1, 2)}
    assert len(names) == len(set(names)) == 8 * 4 * 3
    assert set(names) == expected
    # Seed-major: every cell of seed k comes before any of seed k + 1 (an interrupted grid holds whole seeds).
    seeds = [c.seed for c in cells]
    assert seeds == sorted(seeds)
    assert names[:32] == [f"{s}/{m}/seed0" for s in ALL_SETTINGS for m in METHODS]
    # A subset of settings keeps the given settings only.
    assert {c.setting for c in reproduce_paper.first_pass_cells(["vsr-5"])} == {"vsr-5"}
    # Given seeds replace 0-2 (a fixed-lambda study runs all its seeds in one pool), still seed-major.
    five = reproduce_paper.first_pass_cells(["asr-32", "asr-16"], seeds=(0, 1, 2, 3, 4))
    assert [c.seed for c in five] == sorted(c.seed for c in five) and {c.seed for c in five} == {0, 1, 2, 3, 4}
    assert len(five) == 2 * 4 * 5


def test_cell_names_parse_back_and_map_to_the_result_folder(tmp_path):
    cell = Cell.parse("avsr-16-5/decor-100/seed2")
    assert (cell.setting, cell.method, cell.seed) == ("avsr-16-5", "decor-100", 2)
    assert Cell.parse(cell.name) == cell
    assert reproduce_paper.cell_dir(tmp_path, cell) == tmp_path / "runs" / "avsr-16-5" / "decor-100" / "seed2"
    assert reproduction.method_weight("decor-10000") == 1e4 and reproduction.method_weight("base") == 0.0


def test_extra_cells_only_at_high_compression_and_once_lambda_is_chosen():
    settings = ["asr-4", "asr-32", "vsr-5"]
    assert reproduce_paper.extra_cells(settings, {}) == []
    # Base runs alone choose no lambda: no extra cells yet.
    base_only = by_cell(*(result(s, "base", k) for s in settings for k in (0, 1, 2)))
    assert reproduce_paper.extra_cells(settings, base_only) == []
    # asr-4 is low compression (never extra seeds); asr-32 picks decor-100 (the lowest validation WER); vsr-5 has no
    # decorrelation run yet.
    results = {**base_only, **by_cell(
        result("asr-4", "decor-10", 0, val_wer=0.1),
        result("asr-32", "decor-10", 0, val_wer=0.40), result("asr-32", "decor-100", 0, val_wer=0.35),
        result("asr-32", "decor-10000", 0, val_wer=0.50))}
    extra = reproduce_paper.extra_cells(settings, results)
    assert sorted(c.name for c in extra) == sorted(
        ["asr-32/base/seed3", "asr-32/base/seed4", "asr-32/decor-100/seed3", "asr-32/decor-100/seed4"])
    # More seeds where the spread demands them (--extra-seeds): still only the base and the chosen lambda.
    more = reproduce_paper.extra_cells(settings, results, seeds=(5, 6, 7))
    assert sorted(c.name for c in more) == sorted(f"asr-32/{m}/seed{k}" for m in ("base", "decor-100") for k in (5, 6, 7))


def _parsed(cell, lip, extra=()):
    import run_avsr  # heavy (torch, transformers): imported by the one test that needs it

    argv = reproduce_paper.run_avsr_argv(cell, Path("/tmp/o"), lip, list(extra))
    model_args, data_args, training_args = run_avsr.parse_args(argv)
    return argv, model_args, data_args, training_args


def test_run_avsr_argv_gives_each_modality_its_flags_and_run_avsr_accepts_them():
    lip = Path("/tmp/lip_encoder/final")
    argv, m, d, t = _parsed(Cell("avsr-16-5", "decor-100", 2), lip, ["--max_steps", "5"])
    assert (m.modality, m.audio_compression_rate, m.video_compression_rate) == ("avsr", 16, 5)
    assert m.video_encoder == str(lip)
    # AVSR trains with babble and is tested a second time at 0 dB babble, under the report's condition name.
    assert (d.train_noise, d.eval_noise, d.eval_snr_db) == ("babble", "babble", 0.0)
    assert f"{d.eval_noise} {d.eval_snr_db:g} dB" == reproduction.NOISY
    assert (t.decorrelation_weight, t.seed, t.max_steps) == (100.0, 2, 5)
    assert Path(t.output_dir) == Path("/tmp/o/runs/avsr-16-5/decor-100/seed2")
    assert d.final_validation is True and m.final_save == "none"
    assert argv[-2:] == ["--max_steps", "5"]  # the user's flags come last, so they override the grid's

    argv, m, d, t = _parsed(Cell("vsr-5", "base", 0), lip)
    assert (m.modality, m.video_compression_rate, m.video_encoder) == ("vsr", 5, str(lip))
    assert (d.train_noise, d.eval_noise) == ("none", "none") and t.decorrelation_weight == 0.0

    argv, m, d, t = _parsed(Cell("asr-32", "decor-10000", 1), None)
    assert (m.modality, m.audio_compression_rate) == ("asr", 32)
    assert "--video_encoder" not in argv and (d.train_noise, d.eval_noise) == ("none", "none")
    assert t.decorrelation_weight == 1e4


# ---- statistics ----------------------------------------------------------------------------------------------------


def test_mean_std_is_the_sample_std_over_finite_values():
    stat = reproduction.mean_std([0.1, 0.2, 0.6, None, float("nan")])
    # mean 0.3; squared deviations 0.04 + 0.01 + 0.09 = 0.14 over n - 1 = 2 -> std sqrt(0.07)
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(0.3) and stat["std"] == pytest.approx(math.sqrt(0.07))
    one = reproduction.mean_std([0.25])
    assert one["n"] == 1 and one["mean"] == 0.25 and math.isnan(one["std"])
    assert reproduction.mean_std([None]) is None


def test_compare_calls_a_difference_only_beyond_twice_its_standard_error():
    a = reproduction.mean_std([0.30, 0.32, 0.34])  # mean 0.32, std 0.02
    b = reproduction.mean_std([0.25, 0.27, 0.29])  # mean 0.27, std 0.02
    c = reproduction.mean_std([0.29, 0.31, 0.33])  # mean 0.31, std 0.02
    se = math.sqrt(0.02**2 / 3 + 0.02**2 / 3)  # 0.01633: 2 SE = 0.0327
    ab = reproduction.compare(a, b)
    assert ab["difference"] == pytest.approx(-0.05) and ab["se"] == pytest.approx(se) and ab["separable"]
    ac = reproduction.compare(a, c)
    assert ac["difference"] == pytest.approx(-0.01) and not ac["separable"]
    assert reproduction.verdict(ab) == "lower" and reproduction.verdict(reproduction.compare(b, a)) == "higher"
    assert reproduction.verdict(ac) == "not separable from seed variance"
    # One seed on either side: no call.
    assert reproduction.compare(a, reproduction.mean_std([0.1])) is None
    assert reproduction.verdict(None) == "too few seeds"


def test_lambda_is_chosen_on_mean_validation_wer_ties_broken_by_validation_ce():
    results = by_cell(
        result("asr-16", "base", 0, val_wer=0.01),  # base is never a candidate, however low its WER
        result("asr-16", "decor-10", 0, val_wer=0.20, val_ce=0.9), result("asr-16", "decor-10", 1, val_wer=0.40),
        result("asr-16", "decor-100", 0, val_wer=0.25), result("asr-16", "decor-100", 1, val_wer=0.45),
        result("asr-16", "decor-10000", 0, val_wer=0.31), result("asr-16", "decor-10000", 1, val_wer=0.31))
    # means: decor-10 0.30, decor-100 0.35, decor-10000 0.31 (a single seed's 0.20 does not decide, the mean does)
    assert reproduction.choose_lambda("asr-16", results) == "decor-10"
    # A tie on the mean WER goes to the lower mean validation CE: decor-10's is (0.9 + 0.5) / 2 = 0.7 > 0.5.
    results["asr-16/decor-10000/seed1"]["validation"]["wer"] = 0.29  # decor-10000 mean 0.30 too
    assert reproduction.choose_lambda("asr-16", results) == "decor-10000"
    assert reproduction.choose_lambda("asr-32", results) is None


def test_lambda_choice_ignores_the_extra_seeds_of_the_chosen_lambda():
    """Extra seeds (3, 4) are run only for the chosen lambda; counting them could flip the choice to a lambda with
    fewer seeds, whose extra seeds were never run (and Table 1 would then compare 5 base seeds with 3)."""
    results = by_cell(
        *(result("vsr-5", "decor-10", k, val_wer=0.30) for k in (0, 1, 2)),
        *(result("vsr-5", "decor-100", k, val_wer=0.31) for k in (0, 1, 2)))
    assert reproduction.choose_lambda("vsr-5", results) == "decor-10"
    results.update(by_cell(*(result("vsr-5", "decor-10", k, val_wer=0.40) for k in (3, 4))))
    assert reproduction.choose_lambda("vsr-5", results) == "decor-10"
    assert {c.method for c in reproduce_paper.extra_cells(["vsr-5"], results)} == {"base", "decor-10"}


def test_lambdas_are_compared_on_the_seeds_they_share():
    """One seed's value against a three-seed mean would favour the noisier side; the choice uses the shared seeds."""
    results = by_cell(result("asr-32", "decor-10", 0, val_wer=0.05), result("asr-32", "decor-10", 1, val_wer=0.30),
                      result("asr-32", "decor-10", 2, val_wer=0.30), result("asr-32", "decor-100", 0, val_wer=0.10))
    # Means over each weight's own seeds would pick decor-100 (0.10 < 0.217); at seed 0, which both have, decor-10 wins.
    assert reproduction.choice_seeds("asr-32", results) == [0]
    assert reproduction.choose_lambda("asr-32", results) == "decor-10"
    results["asr-32/decor-100/seed0"]["validation"]["wer"] = 0.04
    assert reproduction.choose_lambda("asr-32", results) == "decor-100"
    # No seed in common: each weight's own first-pass seeds, said by an empty list.
    results = by_cell(result("asr-32", "decor-10", 1, val_wer=0.20), result("asr-32", "decor-100", 0, val_wer=0.30))
    assert reproduction.choice_seeds("asr-32", results) == []
    assert reproduction.choose_lambda("asr-32", results) == "decor-10"
    assert reproduction.lambda_table(results)[2].endswith("| decor-10 (of 2 of 3 weights run) | each λ's own |")
    # With every weight of the paper's set run, the choice stands alone.
    results = by_cell(*(result("asr-32", m, 0, val_wer=v)
                        for m, v in (("decor-10", 0.2), ("decor-100", 0.1), ("decor-10000", 0.4))))
    assert reproduction.lambda_table(results)[2].endswith("| decor-100 | 0 |")


# ---- tables and readings -------------------------------------------------------------------------------------------


def wer_grid(high_decor, low_decor=(0.11, 0.13, 0.15)):
    """asr-32 (high compression): base test WER 0.30/0.32/0.34; asr-4 (low): base 0.10/0.12/0.14; asr-16: one seed."""
    cells = []
    for k in (0, 1, 2):
        cells += [result("asr-32", "base", k, test_wer=(0.30, 0.32, 0.34)[k]),
                  result("asr-32", "decor-10", k, val_wer=0.2, test_wer=high_decor[k]),
                  result("asr-32", "decor-100", k, val_wer=0.4),
                  result("asr-4", "base", k, test_wer=(0.10, 0.12, 0.14)[k]),
                  result("asr-4", "decor-100", k, val_wer=0.1, test_wer=low_decor[k])]
    cells += [result("asr-16", "base", 0, test_wer=0.2), result("asr-16", "decor-10", 0, val_wer=0.2, test_wer=0.1)]
    return by_cell(*cells)


def test_table1_reads_lower_not_separable_and_too_few_seeds_with_the_numbers():
    rows, t1, _, _, reading = report_parts(wer_grid(high_decor=(0.25, 0.27, 0.29)))
    # asr-32: 32.00 -> 27.00, difference -5.00, 2 SE = 200 * sqrt(2 * 0.02^2 / 3) = 3.27: lower.
    assert table_row(rows, "ASR (32)")[:5] == ["32.00 ± 2.00 (n=3)", "decor-10 (of 2 of 3 weights run)",
                                              "27.00 ± 2.00 (n=3)", "-5.00 ± 3.27", "lower"]
    # asr-4: 12.00 -> 13.00, +1.00 within 3.27: not separable.
    assert table_row(rows, "ASR (4)")[1:5] == ["decor-100 (of 1 of 3 weights run)", "13.00 ± 2.00 (n=3)",
                                               "+1.00 ± 3.27", "not separable from seed variance"]
    # asr-16: one seed each.
    assert table_row(rows, "ASR (16)")[3:5] == ["-", "too few seeds"]
    assert t1[("asr-32", "clean")]["compare"]["difference"] == pytest.approx(-0.05)
    # (g): the one high-compression setting with seeds enough is lower, the low one neutral.
    assert reading["(g)"][0] == "holds"


@pytest.mark.parametrize("high_decor, expected", [
    ((0.29, 0.31, 0.33), "not separable from seed variance"),  # -1.00 within 3.27
    ((0.36, 0.38, 0.40), "does not hold"),  # +6.00: worse at high compression
])
def test_reading_g_when_decorrelation_does_not_help(high_decor, expected):
    assert report_parts(wer_grid(high_decor))[4]["(g)"][0] == expected


def test_reading_g_says_too_few_seeds_with_one_seed_per_setting():
    results = by_cell(result("asr-32", "base", 0), result("asr-32", "decor-10", 0, test_wer=0.1))
    assert report_parts(results)[4]["(g)"][0] == "too few seeds"


def test_avsr_rows_have_a_clean_and_a_babble_condition():
    results = by_cell(*(r for k in (0, 1) for r in (
        result("avsr-16-5", "base", k, test_wer=0.10, noisy_wer=(0.40, 0.50)[k]),
        result("avsr-16-5", "decor-10", k, test_wer=0.10, noisy_wer=(0.30, 0.40)[k]))))
    rows, t1, *_ = report_parts(results)
    assert set(t1) == {("avsr-16-5", "clean"), ("avsr-16-5", "babble 0 dB")}
    # babble: 45.00 ± 7.07 -> 35.00 ± 7.07, -10.00 with 2 SE = 200 * sqrt(2 * 0.005 / 2) = 14.14: not separable.
    assert table_row(rows, "AVSR (16,5), babble 0 dB")[:5] == [
        "45.00 ± 7.07 (n=2)", "decor-10 (of 1 of 3 weights run)", "35.00 ± 7.07 (n=2)", "-10.00 ± 14.14",
        "not separable from seed variance"]


def sink_grid(end_by_type, seeds=(0, 1, 2), decor_end=(0.1, 0.2, 0.3), decor_ratio=(100.0, 110.0, 120.0)):
    """asr-32 base runs whose intermediate sinks go 0 -> 1.0/1.25/1.5 (mean 1.25, std 0.25), massive ratio
    1000/1100/1200; decor-10 runs at `decor_end` sinks and `decor_ratio`."""
    cells = []
    for k in seeds:
        end = (1.0, 1.25, 1.5)[k]
        cells.append(result("asr-32", "base", k, start=profile(0.0, bos=0.6),
                            end=profile(end, by_type={t: end * share for t, share in end_by_type.items()},
                                        ratio=(1000.0, 1100.0, 1200.0)[k], cos_sinks=0.95, cos_others=0.3)))
        cells.append(result("asr-32", "decor-10", k, val_wer=0.2, start=profile(0.0, bos=0.6),
                            end=profile(decor_end[k], ratio=decor_ratio[k])))
    return by_cell(*cells)


def test_sink_readings_hold_when_sinks_emerge_on_low_semantic_tokens_and_decorrelation_removes_them():
    _, _, _, sink_rows, reading = report_parts(sink_grid({"BOS": 0.5, "prompt": 0.25, "transcript": 0.25}))
    assert reading["(a)"][0] == "holds"  # BOS sink in 60 % of the layers at step 0 (> 30 %)
    assert "60 ± 0 % of layers" in reading["(a)"][1] and "all 6 runs" in reading["(a)"][1]
    # (b): change 1.25 > 2 * 0.25 / sqrt(3) = 0.29; 75 % of the sinks on BOS-like / prompt tokens.
    assert reading["(b)"][0] == "holds" and "75 ± 0 %" in reading["(b)"][1]
    assert reading["(d)"][0] == "holds"  # cos 0.95 to BOS for sinks, 0.3 for the others
    # (f): sinks 1.25 -> 0.20, -1.05 beyond 2 * sqrt(0.25^2 / 3 + 0.1^2 / 3) = 0.31; ratio 1100 -> 110.
    assert reading["(f)"][0] == "holds"
    assert "sinks 1.25 ± 0.25 -> 0.20 ± 0.10 (lower), max ratio 1100 ± 100 -> 110 ± 10 (lower)" in reading["(f)"][1]
    assert reading["(e)"][0] == "eq. 8: not measured; eq. 9: not measured"
    assert table_row(sink_rows, "ASR (32) | base")[1:6] == ["0.00 ± 0.00 -> 1.25 ± 0.25 (n=3)", "75 ± 0 %",
                                                    "80 ± 0 %", "1100 ± 100", "0.95 ± 0.00 / 0.30 ± 0.00"]


def test_reading_b_does_not_hold_when_the_new_sinks_are_on_transcript_tokens():
    """The sinks clearly emerge (1.25 beyond 2 SE) but none on a low-semantic token: the claim fails on its second
    half, which is not a matter of seed variance."""
    reading = report_parts(sink_grid({"transcript": 1.0}))[4]
    assert reading["(b)"][0] == "does not hold" and "; 0 ± 0 %" in reading["(b)"][1]


def test_reading_f_says_too_few_seeds_with_one_seed():
    reading = report_parts(sink_grid({"BOS": 1.0}, seeds=(0,)))[4]
    assert reading["(f)"][0] == "too few seeds"
    assert "(too few seeds)" in reading["(f)"][1]


@pytest.mark.parametrize("decor_end, decor_ratio, expected", [
    ((1.0, 1.25, 1.5), (1000.0, 1100.0, 1200.0), "not separable from seed variance"),  # the same as base
    ((2.0, 2.25, 2.5), (1000.0, 1100.0, 1200.0), "does not hold"),  # +1.00 sinks beyond 2 SE = 0.41, ratio the same
    ((0.1, 0.2, 0.3), (1000.0, 1100.0, 1200.0), "partly: fewer sinks in 1 of 1 settings, lower ratio in 0"),
])
def test_reading_f_when_decorrelation_does_not_remove_sinks(decor_end, decor_ratio, expected):
    assert report_parts(sink_grid({"BOS": 1.0}, decor_end=decor_end, decor_ratio=decor_ratio))[4]["(f)"][0] == expected


def act_block(wer, ratio=1000.0, heads=3):
    return {"search": {"heads": [[2, h] for h in range(heads)]}, "test": {"clean": {"wer": wer}},
            "sinks": {"profile": {"massive": {"max_ratio": ratio}}}}


def act_grid(act_wers, decor_wers, seeds=(0, 1, 2), base_wers=None):
    cells = []
    for k in seeds:
        cells.append(result("asr-32", "base", k, test_wer=base_wers[k] if base_wers else 0.30, start=profile(0.0), end=profile(1.0, ratio=1000.0),
                            act=act_block(act_wers[k])))
        cells.append(result("asr-32", "decor-10", k, val_wer=0.2, test_wer=decor_wers[k]))
    return by_cell(*cells)


def test_table2_and_reading_h_hold_when_decorrelation_is_separably_below_act():
    # ACT 0.28/0.29/0.30 (mean 0.29, std 0.01), decorrelation 0.24/0.25/0.26 (0.25, 0.01): 4.00 beyond 1.63.
    _, _, t2_rows, _, reading = report_parts(act_grid((0.28, 0.29, 0.30), (0.24, 0.25, 0.26)))
    assert table_row(t2_rows, "ASR (32)")[:6] == ["30.00 ± 0.00 (n=3)", "29.00 ± 1.00 (n=3)", "25.00 ± 1.00 (n=3)",
                                                 "-1.00 ± 1.15", "-1.00 ± 1.15", "1000 ± 0 / 1000 ± 0"]
    assert reading["(h)"][0] == "holds"


def test_act_against_its_own_base_model_is_compared_seed_by_seed():
    # Base models spread over 10-30 %; ACT adds one point to each. Unpaired, the spread hides it (+1.00 +- 16.33);
    # paired (ACT decodes the same model), the differences are 1, 1, 1 points: separably higher.
    grid = act_grid((0.11, 0.21, 0.31), (0.24, 0.25, 0.26), base_wers=(0.10, 0.20, 0.30))
    _, _, t2_rows, _, reading = report_parts(grid)
    row = table_row(t2_rows, "ASR (32)")
    assert row[3] == "+1.00 ± 16.33" and row[4] == "+1.00 ± 0.00"
    assert "paired over seeds +1.00 ± 0.00, higher" in reading["(h)"][1]
    paired = reproduction.compare_paired([0.01, 0.03])
    assert paired["difference"] == pytest.approx(0.02) and paired["se"] == pytest.approx(0.01)
    assert paired["separable"] is False  # 0.02 is exactly 2 SE: not beyond it
    assert reproduction.compare_paired([0.01]) is None


@pytest.mark.parametrize("act_wers, decor_wers, seeds, expected", [
    ((0.28, 0.29, 0.30), (0.27, 0.28, 0.29), (0, 1, 2), "not separable from seed variance"),  # -1.00 within 1.63
    ((0.20, 0.21, 0.22), (0.24, 0.25, 0.26), (0, 1, 2), "does not hold"),  # ACT separably below decorrelation
    ((0.40,), (0.20,), (0,), "too few seeds"),  # one seed: no call, however large the gap
])
def test_reading_h_calls_act_against_decorrelation_only_beyond_two_standard_errors(act_wers, decor_wers, seeds,
                                                                                   expected):
    assert report_parts(act_grid(act_wers, decor_wers, seeds))[4]["(h)"][0] == expected


# ---- the whole report, from result files ---------------------------------------------------------------------------


def real_copies():
    """Three seeds of asr-32 base and decor-10 made from the real result file, with test WERs set here."""
    real = json.loads(REAL_RESULT.read_text())
    out = []
    for method, wers in (("base", (0.30, 0.32, 0.34)), ("decor-10", (0.25, 0.27, 0.29))):
        for k, wer in enumerate(wers):
            r = copy.deepcopy(real)
            r.update(cell=f"asr-32/{method}/seed{k}", method=method, seed=k)
            r["lambda"] = 0.0 if method == "base" else 10.0
            r["test"]["clean"]["wer"] = wer
            if method != "base":
                r.pop("act")
            out.append(r)
    return out


def test_write_report_on_a_folder_of_result_files(tmp_path):
    cells = real_copies()
    for r in cells:
        folder = tmp_path / "runs" / r["setting"] / r["method"] / f"seed{r['seed']}"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(r))
    (tmp_path / "runs" / "asr-32" / "decor-100" / "seed0").mkdir(parents=True)  # a failed cell: no result file
    (tmp_path / "runs" / "asr-32" / "decor-100" / "seed0" / "error.json").write_text('{"cell": "x", "error": "y"}')

    results = reproduction.load_results(tmp_path)
    assert sorted(results) == sorted(r["cell"] for r in cells)
    tables = reproduction.write_report(results, tmp_path / "report")
    text = tables.read_text()
    assert tables == tmp_path / "report" / "tables.md"
    assert text.startswith("6 runs finished (NVIDIA H200).")
    assert ("| ASR (32) | 32.00 ± 2.00 (n=3) | decor-10 (of 1 of 3 weights run) | 27.00 ± 2.00 (n=3) | -5.00 ± 3.27 | "
            "lower |") in text
    # Table 2 from the real ACT block: 0.19099 on every copy; base max ratio from the last history entry.
    real = json.loads(REAL_RESULT.read_text())
    act = 100 * real["act"]["test"]["clean"]["wer"]
    ratio = real["sinks"]["history"][-1]["profile"]["massive"]["max_ratio"]
    assert f"| ASR (32) | 32.00 ± 2.00 (n=3) | {act:.2f} ± 0.00 (n=3) | 27.00 ± 2.00 (n=3) |" in text
    assert f"| {ratio:.0f} ± 0 / {real['act']['sinks']['profile']['massive']['max_ratio']:.0f} ± 0 |" in text
    assert text.count("- **(") == 8  # the readings (a)-(h)
    # When "end" was measured, and the trained model's own analysis beside it.
    last_step = real["sinks"]["history"][-1]["step"]
    assert f"'end' is each run's last sink measurement: step {last_step};" in text
    final = real["sinks"]["final"]
    with_sink = 3 * bool(final["intermediate_sinks"])
    bos_layers = f"{len(final['bos_sink_layers']):.1f} ± 0.0 (of {final['num_layers']})"
    assert f"| ASR (32) | base | {with_sink} of 3 | {bos_layers} | {final['max_ratio']:.0f} ± 0 |" in text
    grid = json.loads((tmp_path / "report" / "grid.json").read_text())
    row = grid["table1"]["asr-32|clean"]
    assert row["base"]["mean"] == pytest.approx(0.32) and row["decor"]["mean"] == pytest.approx(0.27)
    assert row["base"]["n"] == row["decor"]["n"] == 3 and row["lambda"] == "decor-10"
    for name in ("table1.png", "emergence.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Figures: table1.png, emergence.png" in text


# ---- running cells -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_run_cells_after_the_deadline_starts_no_cell(tmp_path, workers, caplog):
    # A flag run_avsr rejects: should a cell start, it fails at once (instead of training) and the test sees it.
    cells = [Cell("asr-4", "base", 0), Cell("asr-32", "base", 0)]
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="reproduce_paper"):
        reproduce_paper.run_cells(cells, tmp_path, None, ["--not_a_run_avsr_flag"], workers=workers, force=False,
                                  deadline=time.time() - 1)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "runs").exists()
    assert "time budget spent: 2 cells left for a rerun" in caplog.text


def test_run_cells_skips_cells_that_have_a_result_file(tmp_path):
    cell = Cell("asr-4", "base", 0)
    reproduce_paper.write_json_atomic(reproduce_paper.cell_dir(tmp_path, cell) / "result.json", {"cell": cell.name})
    reproduce_paper.run_cells([cell], tmp_path, None, ["--not_a_run_avsr_flag"], workers=1, force=False,
                              deadline=None)
    assert sorted(p.name for p in reproduce_paper.cell_dir(tmp_path, cell).iterdir()) == ["result.json"]


def test_reading_g_with_single_runs_lists_them():
    results = by_cell(result("asr-32", "base", 0, test_wer=0.20), result("asr-32", "decor-10", 0, test_wer=0.30))
    verdict, detail = report_parts(results)[4]["(g)"]
    assert verdict == "too few seeds"
    assert "ASR (32) 20.00 -> 30.00 % (n=1, 1)" in detail


def test_a_broken_result_file_is_named(tmp_path):
    path = tmp_path / "runs" / "asr-32" / "base" / "seed0" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"cell": ')
    with pytest.raises(ValueError, match="asr-32/base/seed0/result.json"):
        reproduction.load_results(tmp_path)


def test_sink_timing_note_says_when_end_was_measured():
    def result(epochs, last, trained=None):
        r = {"sinks": {"history": [{"step": 0}, {"step": last}]}, "test": {"clean": {"epoch": epochs}}}
        if trained is not None:
            r["trained_steps"] = trained
        return r

    assert reproduction.sink_timing_note({}) == []
    three = reproduction.sink_timing_note({"a": result(3.0, 450)})[0]
    assert three == "'end' is each run's last sink measurement: step 450; the runs trained for 3 epoch(s)."
    # Six epochs measured only up to the monitor's last step: the note says the sink columns are the halfway model.
    six = reproduction.sink_timing_note({"a": result(6.0, 450)})[0]
    assert "predate the measurement at the end of training" in six and "at step 450" in six
    # Runs that measured at the end of training say how long they trained instead.
    ended = reproduction.sink_timing_note({"a": result(6.0, 900, trained=900)})[0]
    assert ended.endswith("step 900; the runs trained for 6 epoch(s) (900 steps).")


# ---- weights outside the paper's set, several grid folders, reruns --------------------------------------------------


def write_cells(folder: Path, *results):
    for r in results:
        path = folder / "runs" / r["setting"] / r["method"] / f"seed{r['seed']}" / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))


def test_other_lambdas_make_their_cells_and_never_take_part_in_the_choice():
    cells = reproduce_paper.first_pass_cells(["asr-32"], seeds=(0,), lambdas=(0.1, 1.0))
    assert [c.name for c in cells] == ["asr-32/base/seed0", "asr-32/decor-0.1/seed0", "asr-32/decor-1/seed0"]
    assert Cell.parse("asr-32/decor-0.1/seed0").method == "decor-0.1"
    assert reproduction.method_weight("decor-0.1") == 0.1
    # decor-1 has the lowest validation WER, but lambda is chosen among the paper's set, as the paper chooses it.
    results = by_cell(result("asr-32", "decor-1", 0, val_wer=0.05), result("asr-32", "decor-10", 0, val_wer=0.30),
                      result("asr-32", "decor-100", 0, val_wer=0.40))
    assert reproduction.choose_lambda("asr-32", results) == "decor-10"
    header, separator, row = reproduction.lambda_table(results)
    assert "λ = 1 (not the paper's)" in header and "λ = 10 |" in header
    assert header.count("|") == separator.count("|") == row.count("|")
    assert row == "| ASR (32) | - | 5.00 (n=1) | 30.00 (n=1) | 40.00 (n=1) | decor-10 (of 2 of 3 weights run) | 0 |"


def test_every_lambda_is_compared_with_the_base_model_of_the_same_seed():
    # The seeds differ a lot (base 10, 20, 30 %), lambda 1 is 1.0, 1.5, 2.0 points above its own seed's base: the
    # unpaired difference is lost in the seeds' spread, the paired one is not.
    results = by_cell(*(result("asr-32", "base", k, test_wer=w) for k, w in enumerate((0.10, 0.20, 0.30))),
                      *(result("asr-32", "decor-1", k, test_wer=w) for k, w in enumerate((0.110, 0.215, 0.320))),
                      result("asr-32", "decor-100", 0, test_wer=0.40),  # one pair: a difference, no verdict
                      result("asr-32", "decor-10000", 5, test_wer=0.50))  # no base of seed 5: no pair
    rows, data = reproduction.paired_lambda_table(results)
    paired = data[("asr-32", "clean", 1.0)]["paired"]
    assert paired["difference"] == pytest.approx(0.015) and paired["se"] == pytest.approx(0.005 / math.sqrt(3))
    assert paired["separable"]
    assert reproduction.compare(reproduction.mean_std([0.1, 0.2, 0.3]),
                                data[("asr-32", "clean", 1.0)]["wer"])["separable"] is False
    cells = table_row(rows, "ASR (32)")
    assert cells[0] == "21.50 ± 10.50 (n=3), Δ +1.50 ± 0.58 (higher)"
    assert cells[1] == "40.00 (n=1), Δ +30.00 (1 pair)"
    assert cells[2] == "50.00 (n=1)"
    assert data[("asr-32", "clean", 10000.0)]["pairs"] == 0


def test_one_report_over_several_grid_folders_and_a_cell_in_two_is_an_error(tmp_path):
    write_cells(tmp_path / "a", result("asr-32", "base", 0), result("asr-32", "decor-10", 0))
    write_cells(tmp_path / "b", result("avsr-1-1", "base", 0, noisy_wer=0.5))
    results = reproduction.load_results(tmp_path / "a", tmp_path / "b")
    assert sorted(results) == ["asr-32/base/seed0", "asr-32/decor-10/seed0", "avsr-1-1/base/seed0"]
    write_cells(tmp_path / "c", result("asr-32", "base", 0, test_wer=0.9))
    with pytest.raises(ValueError, match=r"asr-32/base/seed0 has two result files, .*a/runs.* and .*c/runs"):
        reproduction.load_results(tmp_path / "a", tmp_path / "c")


def test_a_folder_inside_a_grids_runs_brings_only_its_own_cells(tmp_path):
    """One setting of a grid joins a study without the grid's other settings (e.g. ASR (4) of a grid whose video cells
    used another lip encoder)."""
    write_cells(tmp_path / "grid", result("asr-4", "base", 0), result("asr-4", "decor-10", 1),
                result("vsr-5", "base", 0))
    write_cells(tmp_path / "new", result("vsr-5", "base", 0, test_wer=0.9))
    results = reproduction.load_results(tmp_path / "new", tmp_path / "grid" / "runs" / "asr-4")
    assert sorted(results) == ["asr-4/base/seed0", "asr-4/decor-10/seed1", "vsr-5/base/seed0"]
    assert results["vsr-5/base/seed0"]["test"]["clean"]["wer"] == 0.9
    with pytest.raises(SystemExit):  # a mistyped folder is an error, not an empty study
        reproduce_paper.main(["--report", "--out", str(tmp_path / "new"), "--include", str(tmp_path / "nowhere")])


def test_reruns_are_set_against_the_study_and_counted_nowhere_else(tmp_path):
    study = by_cell(*(result("vsr-5", "base", k, test_wer=w, test_ce=0.3) for k, w in enumerate((0.10, 0.12, 0.14))))
    rerun = result("vsr-5", "base", 0, test_wer=0.13, test_ce=0.35)
    rerun["device"] = "NVIDIA H100 80GB HBM3"
    unmatched = result("vsr-1", "base", 0)
    rows = reproduction.rerun_rows(study, by_cell(rerun, unmatched))
    assert rows[2:] == ["| vsr-5/base/seed0 | 10.00 (0.300), cpu | 13.00 (0.350), NVIDIA H100 80GB HBM3 | +3.00 | "
                        "2.00 (n=3) |"]
    text = reproduction.write_report(study, tmp_path / "report", by_cell(rerun)).read_text()
    assert "Cells rerun independently" in text and "| vsr-5/base/seed0 | 10.00 (0.300)" in text
    assert text.startswith("3 runs finished (cpu).")  # the rerun is not one of the study's runs
    assert "12.00 ± 2.00 (n=3)" in text  # the base's test WER over the study's three seeds, without the rerun


def test_the_dose_response_lists_each_weight_of_a_setting_run_at_several(tmp_path):
    base_end = profile(1.0, cos_sinks=0.99, cos_others=0.5, ratio=12000.0)
    decor_end = profile(1.0, cos_sinks=0.8, cos_others=0.01, ratio=9000.0)
    results = by_cell(
        *(result("asr-32", "base", k, test_wer=0.07, start=profile(0.3), end=base_end) for k in (0, 1)),
        *(result("asr-32", "decor-1", k, test_wer=w, start=profile(0.3), end=decor_end) for k, w in ((0, 0.08), (1, 0.10))),
        result("asr-32", "decor-10", 0, test_wer=0.2, start=profile(0.3), end=profile(0.0, cos_others=0.0)),
        result("asr-16", "decor-10", 0))  # one weight: no dose-response
    for r in results.values():
        r["test"]["clean"]["decor_loss"] = {"base": 0.3, "decor-1": 0.02, "decor-10": 0.004}[r["method"]]
    rows = reproduction.dose_rows(results)
    assert len(rows) == 2 + 3 and not any("ASR (16)" in r for r in rows)
    assert rows[2] == ("| ASR (32) | 0 | 2 | 7.00 ± 0.00 | 0.500 ± 0.000 | 0.300 ± 0.000 | 1.00 ± 0.00 | 0.99 ± 0.00 / "
                       "0.50 ± 0.00 | 12000 ± 0 |")
    assert rows[3].startswith("| ASR (32) | 1 | 2 | 9.00 ± 1.41 | 0.500 ± 0.000 | 0.020 ± 0.000 | 1.00 ± 0.00 | 0.80")
    assert rows[4].startswith("| ASR (32) | 10 | 1 | 20.00 | 0.500 | 0.004 | 0.00 | - / 0.00 |")
    assert reproduction.plot_dose(results, tmp_path / "dose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert reproduction.plot_dose(by_cell(result("asr-32", "decor-10", 0)), tmp_path / "none.png") is None


def test_a_setting_whose_cells_used_different_lip_encoders_is_refused(tmp_path):
    folder = tmp_path / "lip"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "pretraining.json").write_text('{"validation_frame_accuracy": 0.888}')
    fingerprint = reproduce_paper.lip_encoder_fingerprint(folder)
    assert fingerprint == {"sha256": hashlib.sha256(b"weights").hexdigest(), "validation_frame_accuracy": 0.888}
    old = result("vsr-5", "base", 0)  # a result file from before the fingerprint: "unrecorded"
    new = {**result("vsr-5", "decor-100", 0), "video_encoder": fingerprint}
    with pytest.raises(ValueError, match="vsr-5: cells with different lip encoders"):
        reproduction.check_one_lip_encoder(by_cell(old, new))
    with pytest.raises(ValueError, match="different lip encoders"):
        reproduction.write_report(by_cell(old, new), tmp_path / "report")
    # One encoder per setting is fine, whichever; ASR cells have none.
    reproduction.check_one_lip_encoder(by_cell(old, {**result("avsr-1-1", "base", 0), "video_encoder": fingerprint},
                                                result("asr-32", "base", 0)))
