"""Reproduce the paper's findings on the embedded default: one resumable command for the whole grid.

    python examples/reproduce_paper.py                          # everything: corpus, lip encoder, grid, report
    python examples/reproduce_paper.py --only "asr-32/*"        # a subset (shell-style patterns over cell names)
    python examples/reproduce_paper.py --report                 # tables and figures from the finished cells only
    python examples/reproduce_paper.py --workers 4              # several runs side by side (one GPU fits many)
    python examples/reproduce_paper.py --lambdas 0.1 1 --only "asr-32/decor-*"   # weights below the paper's set
    python examples/reproduce_paper.py --report --out OUT --include GRID2 GRID3 --reruns RERUNS
                                                                # one report over several grids' result files

The grid (issue 15): SmolLM2-135M + Whisper tiny.en, with the viseme-pretrained lip encoder of
`examples/pretrain_lip_encoder.py` (frozen) for VSR and AVSR, at the compression rates of the paper's Table 1:
ASR (4), (16), (32); VSR (1), (5); AVSR (1,1), (4,2), (16,5). Each setting is trained without the decorrelation loss
("base") and with lambda in {10, 1e2, 1e4}; lambda is chosen per setting on the validation split (the mean validation
WER over the first-pass seeds 0-2 that every λ has, ties broken by the validation CE), as the paper chooses it. Every run is the main job's recipe
(`examples/run_avsr.py`: 3 epochs, batch 8, LoRA r16 on q/v, AdamW 2e-3, cosine); AVSR is trained with babble noise
at the original's SNR set so that the video has something to add, and is tested clean and at 0 dB babble. Base runs of
ASR (32) and AVSR (16,5) are also decoded under ACT (Table 2), with heads chosen on the validation split.

A cell is `SETTING/METHOD/seedK` (e.g. `avsr-16-5/decor-100/seed2`). Its result file
`OUT/runs/SETTING/METHOD/seedK/result.json` is written atomically when the run ends; a rerun skips cells that have
one (`--force` reruns them). The file holds the exact `run_avsr.py` command of the run, its WER and CE on validation
and test, and the sink measurements: before fine-tuning (step 0), at a few steps of training and after it, and under
ACT. `--report` (also run at the end of the grid) writes `OUT/report/`: `tables.md` (the tables of RESULTS.md's
"Reproduction" section, with the reading of each claim), `grid.json` and the figures.

Statistics: mean +- sample standard deviation over seeds. A difference is called only when it exceeds twice its
standard error, sqrt(s1^2 / n1 + s2^2 / n2); otherwise it is "not separable from seed variance".
"""

import argparse
import concurrent.futures
import fnmatch
import json
import logging
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("reproduce_paper")

EXAMPLES = Path(__file__).resolve().parent
if str(EXAMPLES) not in sys.path:  # run_avsr, pretrain_lip_encoder and reproduction live beside this file
    sys.path.insert(0, str(EXAMPLES))

from reproduction import (  # noqa: E402
    ACT_SETTINGS,
    BASE_SEEDS,
    EXTRA_SEEDS,
    FIGURE_SETTINGS,
    HIGH_COMPRESSION,
    LAMBDAS,
    MONITOR_STEPS,
    SETTINGS,
    choose_lambda,
    load_results,
    method_name,
    method_weight,
    write_report,
)

@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.method}/seed{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        setting, method, seed = name.split("/")
        return cls(setting, method, int(seed.removeprefix("seed")))


def first_pass_cells(settings, seeds=BASE_SEEDS, lambdas=LAMBDAS) -> list[Cell]:
    """Seed-major, so that an interrupted grid holds complete seeds for as many settings as possible. `lambdas`: the
    decorrelation weights beside the base (the paper's set by default; others are reported, never chosen)."""
    methods = ["base"] + [method_name(w) for w in lambdas]
    return [Cell(s, m, seed) for seed in seeds for s in settings for m in methods]


def extra_cells(settings, results, seeds=EXTRA_SEEDS) -> list[Cell]:
    """More seeds for the base and the chosen lambda of the high-compression settings, once lambda is chosen."""
    cells = []
    for setting in settings:
        if setting not in HIGH_COMPRESSION:
            continue
        chosen = choose_lambda(setting, results)
        if chosen is None:
            continue
        cells += [Cell(setting, m, seed) for seed in seeds for m in ("base", chosen)]
    return cells


# ---- one cell ------------------------------------------------------------------------------------------------------


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.setting / cell.method / f"seed{cell.seed}"


def run_avsr_argv(cell: Cell, out: Path, lip_encoder: Path | None, extra: list[str]) -> list[str]:
    setting = SETTINGS[cell.setting]
    argv = ["--modality", setting.modality, "--audio_compression_rate", str(setting.audio_rate),
            "--video_compression_rate", str(setting.video_rate),
            "--decorrelation_weight", f"{method_weight(cell.method):g}", "--seed", str(cell.seed),
            "--output_dir", str(cell_dir(out, cell)), "--final_save", "none", "--final_validation", "true"]
    if setting.modality != "asr":
        argv += ["--video_encoder", str(lip_encoder)]
    if setting.modality == "avsr":
        argv += ["--train_noise", "babble", "--eval_noise", "babble", "--eval_snr_db", "0"]
    return argv + list(extra)


def write_json_atomic(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)


class SinkStudy:
    """What a cell measures besides its WER (given to `run_avsr.main` as its `study`).

    Before training it attaches a `SinkMonitorCallback` on a probe batch (the first `probe_size` validation
    utterances, clean, with their transcripts) that measures at `MONITOR_STEPS`; after the test decoding it runs
    `analyze` on the probe (eq. 5-9, the MLP origin; figures into `figure_dir` when given) and, with `act`, ACT: heads
    searched on the validation split by teacher-forced CE (one head at a time over layers 2..L-2, the authors'
    offline filtering; CE instead of WER so that the search costs one forward per head), then the test split
    decoded under ACT and the probe measured under it."""

    def __init__(self, monitor_steps=MONITOR_STEPS, act: bool = False, figure_dir: Path | None = None,
                 probe_size: int = 8, act_layers=None):
        self.monitor_steps, self.act, self.figure_dir = monitor_steps, act, figure_dir
        self.probe_size, self.act_layers = probe_size, act_layers
        self.results = {}

    def attach(self, trainer, context):
        from modeling_llama_avsr.analysis import SinkMonitorCallback, processor_token_types

        rows = [context["validation_set"][i] for i in range(min(self.probe_size, len(context["validation_set"])))]
        self.probe = dict(context["clean_collator"](rows))
        self.types = processor_token_types(context["processor"], self.probe)
        # at_train_end: a run longer than the last monitor step (e.g. 6 epochs) still ends with the trained model's profile.
        self.monitor = SinkMonitorCallback(self.probe, types=self.types, steps=self.monitor_steps,
                                           at_evaluation=False, at_train_end=True)
        trainer.add_callback(self.monitor)

    def _on_device(self, model, batch):
        import torch

        device = next(model.parameters()).device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def finish(self, trainer, context):
        import torch

        from modeling_llama_avsr.analysis import analyze

        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        probe = self._on_device(model, self.probe)
        tokenizer = context["processor"].tokenizer
        valid = self.probe["attention_mask"][0].bool()
        tokens = tokenizer.convert_ids_to_tokens(self.probe["input_ids"][0][valid].tolist())
        # Drop the per-sample sink lists of the intermediate measurements (the profile keeps what the report needs).
        history = [{k: v for k, v in entry.items() if k != "sinks"} for entry in self.monitor.history]
        with torch.autocast(probe["input_ids"].device.type, enabled=False):
            final = analyze(model, probe, types=self.types, out_dir=self.figure_dir, tokens=tokens)
        self.results["sinks"] = {"history": history, "final": _trim_report(final)}
        self.results["trained_steps"] = trainer.state.global_step
        if self.act:
            self.results["act"] = self._act(trainer, model, context)

    def _act(self, trainer, model, context) -> dict:
        import torch

        from modeling_llama_avsr.analysis import act_calibration, search_act_heads, sink_report

        collator = context["clean_collator"]
        rows = list(context["validation_set"])
        batches = [self._on_device(model, collator(rows[i : i + 25])) for i in range(0, len(rows), 25)]

        @torch.no_grad()
        def validation_ce(heads) -> float:
            total = count = 0.0
            with act_calibration(model, heads):
                for batch in batches:
                    tokens = float((batch["labels"] != -100).sum())
                    total += float(model(**batch).loss) * tokens
                    count += tokens
            return total / count

        text = model.config.text_config
        start = time.perf_counter()
        search = search_act_heads(validation_ce, text.num_hidden_layers, text.num_attention_heads,
                                  layers=self.act_layers)
        result = {"search": {**search.to_dict(), "criterion": "validation CE", "history": None,
                             "seconds": round(time.perf_counter() - start, 1)}}
        with act_calibration(model, search.heads):
            result["test"] = {"clean": _strip(trainer.evaluate(context["test_set"], metric_key_prefix="test"))}
            if context.get("noisy_collator") is not None:
                trainer.eval_data_collator = context["noisy_collator"]
                try:
                    result["test"][context["noisy_condition"]] = _strip(
                        trainer.evaluate(context["test_set"], metric_key_prefix="test"))
                finally:
                    trainer.eval_data_collator = collator
            report = sink_report(model, self._on_device(model, self.probe), types=self.types)
        result["sinks"] = {k: v for k, v in report.items() if k != "sinks"}
        return result


def _strip(metrics: dict) -> dict:
    return {k.removeprefix("test_"): v for k, v in metrics.items()}


def _trim_report(report: dict) -> dict:
    """The parts of `analyze`'s report the reading uses (its per-layer table and token strings stay out)."""
    keep = ("num_layers", "num_tokens", "sink_rule", "bos_sink_layers", "intermediate_sinks", "first_massive_entry",
            "massive_features", "max_ratio", "final_norm", "cos_to_bos", "mlp_origin", "interventions",
            "figure_entry", "figures", "token_types", "eq10")
    trimmed = {k: report[k] for k in keep if k in report}
    trimmed["layers"] = [{k: layer[k] for k in ("layer", "bos_relative_score", "intermediate_sinks",
                                                 "intermediate_sink_types", "ratio", "top_activation_feature",
                                                 "massive_tokens", "massive_features")}
                         for layer in report["layers"]]
    return trimmed


def lip_encoder_fingerprint(folder: Path) -> dict:
    """Which lip encoder a video cell used: the sha256 of its weights and its pretraining's validation accuracy. Two
    pretrainings of the same command on different CPUs give different encoders (88.4 and 88.8 % frame accuracy, and
    4 points of VSR (5) WER apart), so the report compares only cells that share one
    (`reproduction.check_one_lip_encoder`)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    info = Path(folder) / "pretraining.json"
    accuracy = json.loads(info.read_text()).get("validation_frame_accuracy") if info.is_file() else None
    return {"sha256": digest.hexdigest(), "validation_frame_accuracy": accuracy}


def run_cell(cell: Cell, out: Path, lip_encoder: Path | None, extra: list[str], act_layers=None) -> dict:
    """Train and evaluate one cell with run_avsr.py, measuring sinks along the way; write its result file."""
    import torch

    import run_avsr

    argv = run_avsr_argv(cell, out, lip_encoder, extra)
    study = SinkStudy(act=cell.setting in ACT_SETTINGS and cell.method == "base", act_layers=act_layers,
                      figure_dir=cell_dir(out, cell) / "figures"
                      if cell.seed == 0 and cell.setting in FIGURE_SETTINGS else None)
    start = time.perf_counter()
    summary = run_avsr.main(argv, study=study)
    result = {
        "cell": cell.name, "setting": cell.setting, "method": cell.method,
        "lambda": method_weight(cell.method), "seed": cell.seed,
        "command": "python examples/run_avsr.py " + " ".join(argv),
        "validation": summary["final_validation"], "test": summary["test"],
        "train_loss": summary["train_loss"],
        "seconds": {**summary.get("seconds", {}), "cell": round(time.perf_counter() - start, 1)},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **study.results,
    }
    if SETTINGS[cell.setting].modality != "asr":
        result["video_encoder"] = lip_encoder_fingerprint(lip_encoder)
    write_json_atomic(cell_dir(out, cell) / "result.json", result)
    return result


def _worker(job):
    cell, out, lip_encoder, extra, act_layers = job
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_cell(cell, out, lip_encoder, extra, act_layers)
        return cell.name, None
    except Exception:  # one failing cell must not stop the grid; its error file says why
        error = traceback.format_exc()
        write_json_atomic(cell_dir(out, cell) / "error.json", {"cell": cell.name, "error": error})
        return cell.name, error


def run_cells(cells, out, lip_encoder, extra, workers: int, force: bool, deadline: float | None, act_layers=None):
    todo = [c for c in cells if force or not (cell_dir(out, c) / "result.json").is_file()]
    logger.info("%d cells to run (%d already done)", len(todo), len(cells) - len(todo))
    if not todo:
        return
    jobs = [(c, out, lip_encoder, extra, act_layers) for c in todo]
    if workers <= 1:
        for job in jobs:
            if deadline is not None and time.time() > deadline:
                logger.warning("time budget spent: %d cells left for a rerun", len(jobs) - jobs.index(job))
                return
            name, error = _worker(job)
            logger.info("%s %s", name, "failed" if error else "done")
        return
    # spawn: CUDA cannot be forked; each process keeps its compiled kernels across the cells it runs. Cells are handed
    # out one at a time, so that after the deadline no new cell starts while the running ones finish and write.
    pending, running = list(jobs), set()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = 0
        while pending or running:
            while pending and len(running) < workers:
                if deadline is not None and time.time() > deadline:
                    logger.warning("time budget spent: %d cells left for a rerun", len(pending))
                    pending = []
                    break
                running.add(pool.submit(_worker, pending.pop(0)))
            finished, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                name, error = future.result()
                done += 1
                logger.info("[%d/%d] %s %s", done, len(jobs), name, "failed: see error.json" if error else "done")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/reproduce", help="where runs, the lip encoder and the report go")
    parser.add_argument("--only", nargs="*", default=None, help="cell-name patterns, e.g. 'asr-32/*' 'vsr-*/base/*'")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument("--force", action="store_true", help="rerun cells that already have a result file")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished cells")
    parser.add_argument("--no-extra-seeds", action="store_true", help="skip the extra seeds at high compression")
    parser.add_argument("--extra-seeds", type=int, nargs="+", default=list(EXTRA_SEEDS),
                        help=f"the extra seeds of the base and the chosen lambda at high compression (default: "
                             f"{' '.join(map(str, EXTRA_SEEDS))}; more where the spread demands)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(BASE_SEEDS),
                        help="the first pass's seeds, every method (default: %(default)s; lambda is chosen on seeds "
                             f"{' '.join(map(str, BASE_SEEDS))} only, so a study that fixes lambda can run all its seeds "
                             "at once, e.g. --seeds 0 1 2 3 4 --only 'asr-32/base/*' 'asr-32/decor-10/*')")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS),
                        help="decorrelation weights of the first pass besides the base (default: the paper's "
                             "%(default)s); λ is chosen on validation among the paper's set only, other weights are "
                             "reported beside it")
    parser.add_argument("--include", nargs="*", default=[],
                        help="with the report: more grid folders whose result files join OUT's (the same recipe, "
                             "run in other sessions), or folders inside a grid's runs/ (e.g. one setting of it); a "
                             "cell found twice is an error")
    parser.add_argument("--reruns", nargs="*", default=[],
                        help="with the report: grid folders of cells run again independently, set against the "
                             "study's runs of the same cells in a table of their own (cells the study lacks are "
                             "left out)")
    parser.add_argument("--hours", type=float, default=None, help="stop starting new cells after this long")
    parser.add_argument("--lip-encoder", default=None,
                        help="an AVHubertModel folder to use (default: OUT/lip_encoder/final, pretrained if absent)")
    parser.add_argument("--lip-args", default="", help="more flags for pretrain_lip_encoder.py (e.g. '--max_steps 5')")
    parser.add_argument("--act-layers", type=int, nargs="*", default=None,
                        help="layers ACT's head search scores (default: 2..L-2, the authors')")
    parser.add_argument("run_avsr_args", nargs=argparse.REMAINDER,
                        help="after '--': more run_avsr.py flags for every cell (e.g. -- --max_steps 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    extra = [a for a in args.run_avsr_args if a != "--"]
    deadline = None if args.hours is None else time.time() + 3600 * args.hours

    for folder in [*args.include, *args.reruns]:
        if not Path(folder).is_dir():
            parser.error(f"{folder}: no such folder of results")
    if not args.report:
        import pretrain_lip_encoder

        lip_encoder = Path(args.lip_encoder) if args.lip_encoder else out / "lip_encoder" / "final"
        needs_video = any(SETTINGS[s].modality != "asr" for s in args.settings)
        if needs_video and not (lip_encoder / "config.json").is_file():
            pretrain_lip_encoder.main(["--output_dir", str(lip_encoder.parent), *args.lip_args.split()])
        selected = lambda cells: [c for c in cells if not args.only or any(fnmatch.fnmatch(c.name, p) for p in args.only)]
        run_cells(selected(first_pass_cells(args.settings, args.seeds, args.lambdas)), out, lip_encoder, extra,
                  args.workers, args.force, deadline, args.act_layers)
        if not args.no_extra_seeds:
            run_cells(selected(extra_cells(args.settings, load_results(out), args.extra_seeds)), out, lip_encoder, extra,
                      args.workers, args.force, deadline, args.act_layers)

    reruns = load_results(*map(Path, args.reruns)) if args.reruns else None
    report = write_report(load_results(out, *map(Path, args.include)), out / "report", reruns)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
