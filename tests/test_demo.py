"""`umarvel demo` end to end: every stage leaves its outputs, the report is written, and training
beats the untrained model on the unseen test split (beyond noise at the default size)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from umarvel import backbones
from umarvel.cli import main


@pytest.mark.slow
@pytest.mark.parametrize(("family", "size"), [("qwen2-vl", "small"), ("qwen3-vl", "tiny")])
def test_demo_runs_every_stage_and_learns(tmp_path, capsys, family, size):
    """The default demo (size small) on the default family, where the recipe's gain over the
    untrained model must be beyond noise; --size tiny for the other family (every stage runs)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", size, "--family", family]) == 0
    assert json.loads((out / f"checkpoints/tiny-{family}/config.json").read_text())["model_type"] == \
        backbones.get(family).model_type
    runs = out / "runs" / "tiny"
    for stage in ("progressive/nli", "progressive/cc3m", "progressive/mbeir", "hardneg", "reranker", "distill"):
        assert (runs / stage / "DONE").is_file(), stage
    assert (runs / "hardneg.jsonl").is_file()
    averages = {}
    for name in ("untrained", "nli", "cc3m", "mbeir", "hardneg", "distill"):
        for pool in ("local", "global"):
            results = json.loads((runs / "eval" / name / pool / "results.json").read_text())
            assert len(results["rows"]) == 16
            averages[name, pool] = results["average"]
    plus = json.loads((runs / "eval" / "distill+rerank" / "local" / "results.json").read_text())
    assert plus["pool"] == "local" and "rerank" in plus and len(plus["rows"]) == 16
    for pool in ("local", "global"):
        assert averages["mbeir", pool] > averages["untrained", pool]
        assert averages["distill", pool] > averages["untrained", pool]
    report = runs / "report" / "report.md"
    assert report.is_file() and (runs / "report" / "loss.png").stat().st_size > 0
    assert (runs / "report" / "recall.png").stat().st_size > 0
    text = report.read_text()
    assert "untrained" in text and "distill + rerank" in text and "-0.00" not in text
    answer = text.splitlines()[2]  # the one line under the title; --size tiny has too few queries to show a gain
    shown = ("**The recipe worked**: distill beats untrained beyond noise",)
    assert answer.startswith(shown if size == "small" else (*shown, "**Not shown**: distill")), answer
    printed = capsys.readouterr().out
    assert "local avg" in printed and "report:" in printed and answer.replace("**", "") in printed

    # A re-run re-uses every finished step.
    assert main(["demo", "--out", str(out), "--size", size, "--family", family]) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 14
    if family == backbones.DEFAULT:
        _plus_reranker_config_runs_as_its_header_says(out, family)


def _plus_reranker_config_runs_as_its_header_says(out, family):
    """configs/tiny/plus-reranker.yaml, which the demo does not run: trained on the distilled
    model's top 20, then re-scoring that model's rankings (the commands of its header)."""
    from umarvel.demo import tiny_configs, tiny_model_dir, working_directory

    configs = tiny_configs()
    with working_directory(out):
        assert main(["train", "--stage", "reranker", "--config", str(configs / "plus-reranker.yaml"),
                     "--set", f"model.backbone={tiny_model_dir(family)}"]) == 0
        header = json.loads(Path("runs/tiny/plus-reranker/pairs.jsonl").read_text().splitlines()[0])
        assert header["params"]["recall_model"] == "runs/tiny/distill" and header["params"]["top_n"] == 20
        assert main(["eval", "mbeir", "--pool", "local", "--model", "runs/tiny/distill", "--data",
                     "data/synthetic/M-BEIR", "--output-dir", "runs/tiny/eval-plus", "--rerank",
                     "runs/tiny/plus-reranker", "--rerank-top-k", "10", "--alpha", "auto",
                     "--config", str(configs / "base.yaml"), "--set", "encode.cache_dir=cache"]) == 0
    results = json.loads((out / "runs/tiny/eval-plus/local/results.json").read_text())
    assert results["rerank"]["model"].endswith("runs/tiny/plus-reranker/model") and len(results["rows"]) == 16


def test_the_evaluation_worker_runs_jobs_in_order_and_names_a_failed_one(tmp_path, monkeypatch):
    from umarvel.demo import EvaluationWorker
    from umarvel.errors import UmarvelError

    monkeypatch.chdir(tmp_path)
    worker = EvaluationWorker(tmp_path / "evaluations.log")
    try:
        worker.submit(3, "build a model", ["make-tiny-model", "--out", "tiny"])
        worker.submit(5, "a usage error", ["eval", "mbeir", "--no-such-option"])
        worker.submit(7, "never reached", ["make-tiny-model", "--out", "other"])
        with pytest.raises(UmarvelError) as failed:
            worker.finished(wait=True)
    finally:
        worker.close()
    assert "demo step failed (exit 2): umarvel eval mbeir --no-such-option" in str(failed.value)
    assert str(tmp_path / "evaluations.log") in str(failed.value)
    assert (tmp_path / "tiny" / "config.json").is_file()  # the first job ran, in this working directory
    assert "$ umarvel make-tiny-model --out tiny" in (tmp_path / "evaluations.log").read_text()
    assert worker.process.returncode is not None


def test_stopping_the_demo_stops_its_evaluation_worker(tmp_path):
    from umarvel.demo import EvaluationWorker

    worker = EvaluationWorker(tmp_path / "evaluations.log")
    worker.submit(1, "slow", ["make-tiny-model", "--out", str(tmp_path / "tiny")])
    worker.close()  # a job still pending: the worker is killed, not waited for
    assert worker.process.returncode == -9 and not (tmp_path / "tiny" / "config.json").exists()


def test_a_dead_evaluation_worker_is_an_error_naming_its_log(tmp_path):
    from umarvel.demo import EvaluationWorker
    from umarvel.errors import UmarvelError

    worker = EvaluationWorker(tmp_path / "evaluations.log")
    worker.submit(1, "first", ["make-tiny-model", "--out", str(tmp_path / "tiny")])
    worker.process.kill()
    worker.process.wait()
    try:
        with pytest.raises(UmarvelError, match="evaluation process ended unexpectedly .*evaluations.log"):
            worker.submit(2, "next", ["make-tiny-model", "--out", str(tmp_path / "other")])
    finally:
        worker.close()
