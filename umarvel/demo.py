"""`umarvel demo`: the whole U-MARVEL recipe end to end on CPU, tiny model, synthetic benchmark.

It lays out a working directory the way configs/tiny/*.yaml expect (data/synthetic,
runs/tiny/...) with a tiny model of the chosen backbone family at checkpoints/tiny-<family>,
and runs every stage through the same CLI a user runs (the stages that start from a backbone
get `--set model.backbone=`), so the demo exercises exactly the shipped commands and configs.
Finished steps are skipped on a re-run. Evaluations use the synthetic TEST split, which no training step sees.

The tiny model computes on one core (configs/tiny: run.cpu_threads 1), so each stage's evaluation
runs in a second process beside the training that follows it (`EvaluationWorker`), on the core
the training leaves mostly free; only the last evaluation is waited for.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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


def _eval_argv(model: str | Path, out: Path, configs: Path, pool: str = "both", cache: str = "cache") -> list:
    return ["eval", "mbeir", "--pool", pool, "--model", model, "--data", MBEIR, "--output-dir", out,
            "--config", configs / "base.yaml", "--set", f"encode.cache_dir={cache}"]


def tiny_model_dir(family: str) -> str:
    return f"checkpoints/tiny-{backbones.get(family).name}"


@dataclass
class Step:
    """One demo step: a function run here, or an evaluation's CLI arguments run by the worker."""

    description: str
    finished: Callable[[], bool]
    run: Callable[[], None] | None = None
    evaluate: list | None = None


def demo_steps(configs: Path, size: str, seed: int, family: str = backbones.DEFAULT) -> list[Step]:
    """Every step in order; each stage's evaluation right after the training that makes its model."""
    from umarvel.data.synthetic import write_synthetic
    from umarvel.tiny import build_tiny_model

    def done(path: Path | str) -> Callable[[], bool]:
        return lambda: Path(path).exists()

    def evaluation(label: str, evaluated: Path | str) -> Step:
        out = RUNS / "eval" / label.split(" ")[0]
        return Step(f"evaluate {label} (local + global)", done(out / "global" / "results.json"),
                    evaluate=_eval_argv(evaluated, out, configs))

    model = tiny_model_dir(family)
    backbone = ["--set", f"model.backbone={model}"]
    evaluations = {label: evaluation(label, evaluated or model) for label, evaluated, _, _ in EVALUATED}
    plus = RUNS / "eval" / "distill+rerank"
    return [
        Step(f"build the tiny {family}", done(f"{model}/config.json"),
             lambda: build_tiny_model(model, seed=seed, family=family)),
        Step(f"write the synthetic benchmark ({size})", done(f"{MBEIR}/instructions/query_instructions.tsv"),
             lambda: write_synthetic(DATA, seed=seed, size=size)),
        evaluations["untrained"],
        Step("stage 1: progressive NLI -> CC3M -> M-BEIR", done(RUNS / "progressive/mbeir/DONE"),
             lambda: _cli(["train", "--stage", "progressive", "--config", configs / "progressive.yaml", *backbone])),
        evaluations["nli"], evaluations["cc3m"], evaluations["mbeir (progressive)"],
        Step("stage 2a: mine filtered hard negatives", done(RUNS / "hardneg.jsonl"),
             lambda: _cli(["mine-negatives", "--model", RUNS / "progressive/mbeir", "--data", MBEIR,
                           "--out", RUNS / "hardneg.jsonl", "--config", configs / "mine.yaml", "--set", "encode.cache_dir=cache"])),
        Step("stage 2b: continual training with hard negatives", done(RUNS / "hardneg/DONE"),
             lambda: _cli(["train", "--stage", "hardneg", "--config", configs / "hardneg.yaml"])),
        evaluations["hardneg"],
        Step("stage 3a: YES/NO reranker", done(RUNS / "reranker/DONE"),
             lambda: _cli(["train", "--stage", "reranker", "--config", configs / "reranker.yaml", *backbone])),
        Step("stage 3b: distil recall + rerank into the embedder", done(RUNS / "distill/DONE"),
             lambda: _cli(["distill", "--config", configs / "distill.yaml"])),
        evaluations["distill"],
        Step("evaluate distill + the stage-2 reranker (the U-MARVEL+ fusion; local pool, alpha chosen on val)",
             done(plus / "local" / "results.json"),
             # A cache of its own: the distill evaluation beside it encodes the same sets with the same
             # model, and an embedding cache takes one writer per set at a time.
             lambda: _cli([*_eval_argv(RUNS / "distill", plus, configs, "local", cache="cache-rerank"),
                           "--rerank", RUNS / "reranker", "--rerank-top-k", RERANK_TOP_K, "--alpha", "auto"])),
    ]


class EvaluationWorker:
    """A second process that runs evaluations (`umarvel eval ...` arguments) one after another,
    in the order given, while this one goes on; their output goes to `log`.

    It starts at the first evaluation, in a session of its own (Ctrl-C reaches this process,
    which stops it). A job is one JSON line on its stdin; it answers one JSON line per job.
    """

    def __init__(self, log: Path):
        self.log, self.process, self.pending = log, None, {}

    def submit(self, number: int, description: str, argv: list) -> None:
        if self.process is None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            package_root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
            with open(self.log, "a") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", "from umarvel.demo import serve_evaluations; serve_evaluations()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                    start_new_session=True,
                )
        self.pending[number] = (description, [str(a) for a in argv])
        try:
            self.process.stdin.write(json.dumps({"number": number, "argv": self.pending[number][1]}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._ended() from None

    def finished(self, wait: bool = False) -> list[tuple[int, str, float]]:
        """(number, description, seconds) of the jobs finished since the last call; with `wait`,
        of every job still pending. A failed job raises UmarvelError."""
        done = []
        while self.pending and (wait or select.select([self.process.stdout], [], [], 0)[0]):
            line = self.process.stdout.readline()
            if not line:
                raise self._ended()
            reply = json.loads(line)
            description, argv = self.pending.pop(reply["number"])
            if reply["code"]:
                raise UmarvelError(f"demo step failed (exit {reply['code']}): umarvel {' '.join(argv)} "
                                   f"(its output: {self.log})")
            done.append((reply["number"], description, reply["seconds"]))
        return done

    def _ended(self) -> UmarvelError:
        return UmarvelError(f"the demo's evaluation process ended unexpectedly (exit {self.process.wait()}); "
                            f"its output: {self.log}")

    def close(self) -> None:
        """End the process: after its jobs when they all finished, at once otherwise."""
        if self.process is None:
            return
        if self.pending:
            self.process.kill()
        with contextlib.suppress(BrokenPipeError):  # jobs written to a process that has ended
            self.process.stdin.close()
        self.process.wait()
        self.process.stdout.close()


def serve_evaluations() -> None:
    """The worker's loop: run each job's CLI arguments, reply on the stdout it was given (the
    commands' own output goes to its stderr, the log)."""
    from umarvel.cli import run_command

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for line in sys.stdin:
        job = json.loads(line)
        print(f"\n$ umarvel {' '.join(job['argv'])}", flush=True)
        started = time.perf_counter()
        try:
            code = run_command(job["argv"])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stdout.flush()
        replies.write(json.dumps({"number": job["number"], "code": code,
                                  "seconds": round(time.perf_counter() - started, 1)}) + "\n")


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


def _freeze_library_objects() -> None:
    """Import the training libraries and exempt the objects they create from garbage collection
    (they live until the process ends): each Trainer.train starts with a full collection
    (accelerate's free_memory), which over these ~560k objects costs ~0.3 s every time."""
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401

    gc.freeze()


def _report_finished(jobs: list[tuple[int, str, float]], total: int) -> None:
    for number, description, seconds in jobs:
        print(f"[{number}/{total}] {description}: {seconds:.0f} s (beside the other steps)", flush=True)


def run_demo(out: str | os.PathLike, *, size: str = "small", seed: int = 0, family: str = backbones.DEFAULT) -> Path:
    """Run (or finish) the demo in `out`; print the stage table; return the report path."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = tiny_configs()
    started = time.perf_counter()
    with working_directory(out):
        steps = demo_steps(configs, size, seed, family)
        worker = EvaluationWorker(RUNS / "eval" / "evaluations.log")
        _freeze_library_objects()
        try:
            for number, step in enumerate(steps, start=1):
                if step.finished():
                    print(f"[{number}/{len(steps)}] {step.description}: done already, skipped", flush=True)
                elif step.evaluate is not None:
                    worker.submit(number, step.description, step.evaluate)
                    print(f"[{number}/{len(steps)}] {step.description}: started beside the next steps", flush=True)
                else:
                    print(f"[{number}/{len(steps)}] {step.description} ...", flush=True)
                    step_started = time.perf_counter()
                    step.run()
                    print(f"[{number}/{len(steps)}] {step.description}: {time.perf_counter() - step_started:.0f} s",
                          flush=True)
                _report_finished(worker.finished(), len(steps))
            _report_finished(worker.finished(wait=True), len(steps))
        finally:
            worker.close()
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
