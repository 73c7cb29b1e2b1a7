"""`umarvel demo`: the whole U-MARVEL recipe end to end on CPU, tiny model, synthetic benchmark.

It lays out a working directory the way configs/tiny/*.yaml expect (data/synthetic,
runs/tiny/...) with a tiny model of the chosen backbone family at checkpoints/tiny-<family>,
and runs every stage through the same CLI a user runs (the stages that start from a backbone
get `--set model.backbone=`), so the demo exercises exactly the shipped commands and configs.
Finished steps are skipped on a re-run. Evaluations use the synthetic TEST split, which no training step sees.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from umarvel import backbones
from umarvel.errors import UmarvelError
from umarvel.evaluation.significance import load_hits
from umarvel.evaluation.stage_report import (
    StageResult, load_losses, load_results, recipe_verdict, summary_table, write_stage_report,
)

logger = logging.getLogger("umarvel")
DATA = "data/synthetic"
MBEIR = f"{DATA}/M-BEIR"
RUNS = Path("runs/tiny")
RERANK_TOP_K = 10
# (label, model directory to evaluate (None: the tiny backbone), the stage it continued from,
#  its training run directory)
EVALUATED = [
    ("untrained", None, None, None),
    ("nli", RUNS / "progressive/nli", "untrained", RUNS / "progressive/nli"),
    ("cc3m", RUNS / "progressive/cc3m", "nli", RUNS / "progressive/cc3m"),
    ("mbeir (progressive)", RUNS / "progressive/mbeir", "cc3m", RUNS / "progressive/mbeir"),
    ("hardneg", RUNS / "hardneg", "mbeir (progressive)", RUNS / "hardneg"),
    ("distill", RUNS / "distill", "hardneg", RUNS / "distill"),
]


# The configs the demo runs, each with what it is run for (umarvel.deviations' uses); the
# reranker config trains the YES/NO model, which no listed deviation concerns.
RAN_CONFIGS = {
    "progressive.yaml": ("contrastive", "embed"),
    "mine.yaml": ("mine", "embed"),
    "hardneg.yaml": ("contrastive", "embed"),
    "distill.yaml": ("distill", "embed"),
    "base.yaml": ("embed", "mbeir"),
}


def deviation_notes(configs: Path) -> list[str]:
    """The report's section on the deviations from the paper and the official code that the
    configs in `configs` run with, read from them (umarvel.deviations)."""
    from umarvel.config import load_config, read_raw
    from umarvel.deviations import active
    from umarvel.training.stages import stage_configs

    resolved = {}
    for name, uses in RAN_CONFIGS.items():
        path = configs / name
        if read_raw(path, []).get("stages"):
            resolved.update({f"{name} ({stage})": (config, uses) for stage, config in stage_configs(str(path), []).items()})
        else:
            resolved[name] = (load_config(path), uses)
    lines = active(resolved)
    return ["", "## Deviations from the paper and the official code", "",
            "Read from the configs this run used (README: \"Deviations from the paper and the official code\"):", "",
            *(f"- {line}" for line in lines or ["none"])]


def tiny_configs() -> Path:
    """configs/tiny of this checkout (the demo runs the shipped tiny configs)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    if not (path / "progressive.yaml").is_file():
        raise UmarvelError(f"{path} not found: run the demo from a clone of the repository (pip install -e .)")
    return path


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _cli(argv: list[str]) -> None:
    from umarvel.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise UmarvelError(f"demo step failed (exit {code}): umarvel {' '.join(map(str, argv))}")


def _eval_argv(model: str | Path, out: Path, configs: Path, pool: str = "both") -> list:
    return ["eval", "mbeir", "--pool", pool, "--model", model, "--data", MBEIR, "--output-dir", out,
            "--config", configs / "base.yaml", "--set", "encode.cache_dir=cache"]


def tiny_model_dir(family: str) -> str:
    return f"checkpoints/tiny-{backbones.get(family).name}"


def demo_steps(configs: Path, size: str, seed: int,
               family: str = backbones.DEFAULT) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
    """(description, is finished?, run) for every step, in order."""
    from umarvel.data.synthetic import write_synthetic
    from umarvel.tiny import build_tiny_model

    def done(path: Path | str) -> Callable[[], bool]:
        return lambda: Path(path).exists()

    model = tiny_model_dir(family)
    backbone = ["--set", f"model.backbone={model}"]
    steps = [
        (f"build the tiny {family}", done(f"{model}/config.json"),
         lambda: build_tiny_model(model, seed=seed, family=family)),
        (f"write the synthetic benchmark ({size})", done(f"{MBEIR}/instructions/query_instructions.tsv"),
         lambda: write_synthetic(DATA, seed=seed, size=size)),
        ("stage 1: progressive NLI -> CC3M -> M-BEIR", done(RUNS / "progressive/mbeir/DONE"),
         lambda: _cli(["train", "--stage", "progressive", "--config", configs / "progressive.yaml", *backbone])),
        ("stage 2a: mine filtered hard negatives", done(RUNS / "hardneg.jsonl"),
         lambda: _cli(["mine-negatives", "--model", RUNS / "progressive/mbeir", "--data", MBEIR,
                       "--out", RUNS / "hardneg.jsonl", "--config", configs / "mine.yaml", "--set", "encode.cache_dir=cache"])),
        ("stage 2b: continual training with hard negatives", done(RUNS / "hardneg/DONE"),
         lambda: _cli(["train", "--stage", "hardneg", "--config", configs / "hardneg.yaml"])),
        ("stage 3a: YES/NO reranker", done(RUNS / "reranker/DONE"),
         lambda: _cli(["train", "--stage", "reranker", "--config", configs / "reranker.yaml", *backbone])),
        ("stage 3b: distil recall + rerank into the embedder", done(RUNS / "distill/DONE"),
         lambda: _cli(["distill", "--config", configs / "distill.yaml"])),
    ]
    for label, evaluated, _, _ in EVALUATED:
        out = RUNS / "eval" / label.split(" ")[0]
        evaluated = evaluated or model
        steps.append((f"evaluate {label} (local + global)", done(out / "global" / "results.json"),
                      lambda evaluated=evaluated, out=out: _cli(_eval_argv(evaluated, out, configs))))
    plus = RUNS / "eval" / "distill+rerank"
    steps.append(("evaluate distill + the stage-2 reranker (the U-MARVEL+ fusion; local pool, alpha chosen on val)",
                  done(plus / "local" / "results.json"),
                  lambda: _cli([*_eval_argv(RUNS / "distill", plus, configs, "local"), "--rerank", RUNS / "reranker",
                                "--rerank-top-k", RERANK_TOP_K, "--alpha", "auto"])))
    return steps


def collect(runs: Path, mbeir_root: str | Path = MBEIR) -> list[StageResult]:
    from umarvel.data.mbeir import MBEIR as Benchmark

    benchmark = Benchmark(mbeir_root)

    def result(label: str, parent: str | None, eval_dir: Path, run: Path | None) -> StageResult:
        hits = {pool: found for pool in ("local", "global")
                if (found := load_hits(eval_dir, pool, lambda row: benchmark.qrels("test", row)))}
        return StageResult(label, parent, load_results(eval_dir), load_losses(run), hits)

    stages = [result(label, parent, runs / "eval" / label.split(" ")[0], run) for label, _, parent, run in EVALUATED]
    stages.append(result("distill + rerank", "distill", runs / "eval" / "distill+rerank", None))
    return stages


def run_demo(out: str | os.PathLike, *, size: str = "small", seed: int = 0, family: str = backbones.DEFAULT) -> Path:
    """Run (or finish) the demo in `out`; print the stage table; return the report path."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = tiny_configs()
    started = time.perf_counter()
    with working_directory(out):
        steps = demo_steps(configs, size, seed, family)
        for number, (description, finished, run) in enumerate(steps, start=1):
            if finished():
                print(f"[{number}/{len(steps)}] {description}: done already, skipped", flush=True)
                continue
            print(f"[{number}/{len(steps)}] {description} ...", flush=True)
            step_started = time.perf_counter()
            run()
            print(f"[{number}/{len(steps)}] {description}: {time.perf_counter() - step_started:.0f} s", flush=True)
        stages = collect(RUNS)
        headline = recipe_verdict(stages, start="untrained", final="distill")
        notes = [
            f"Tiny random {family}, synthetic M-BEIR-shaped benchmark (size {size}, seed {seed}); "
            "recall on the synthetic TEST split, which no training step sees.",
            "Absolute numbers say nothing about the 7B recipe; the comparison between stages is the point.",
            f"Total wall time of this run: {time.perf_counter() - started:.0f} s.",
            *deviation_notes(configs),
        ]
        report = write_stage_report(RUNS / "report", stages, title="umarvel demo: the U-MARVEL recipe, tiny and on CPU",
                                    notes=notes, headline=headline)
    print()
    print(headline.replace("**", ""))
    print(summary_table(stages))
    print(f"\nreport: {out / report}")
    return out / report
