"""Bootstrap intervals of the stage report: per-query hits from run files agree with the
evaluator's recall, intervals cover their estimate, and "improves on" needs a paired
difference larger than its noise."""
from __future__ import annotations

import numpy as np
import pytest

from umarvel.data.tasks import EVAL_ROWS
from umarvel.evaluation.metrics import evaluate_row
from umarvel.evaluation.report import run_file_name, write_run_file
from umarvel.evaluation.significance import average_interval, load_hits, paired_difference, read_run, verdict
from umarvel.evaluation.stage_report import StageResult, recipe_verdict, summary_table, write_stage_report

ROW = EVAL_ROWS[0]  # visualnews_task0, R@5


def _ranked(n_queries: int, hit_every: int) -> dict[str, list[str]]:
    """Query i finds its positive at rank 1 when i % hit_every == 0, else ranks it 20th."""
    ranked = {}
    for i in range(n_queries):
        others = [f"0:{1000 + i * 100 + j}" for j in range(30)]
        ranked[f"0:{i}"] = [f"0:p{i}"] + others if i % hit_every == 0 else others[:19] + [f"0:p{i}"] + others[19:]
    return ranked


def test_hits_from_a_run_file_give_the_evaluators_recall(tmp_path):
    ranked = _ranked(24, hit_every=3)
    qrels = {qid: {f"0:p{qid.split(':')[1]}"} for qid in ranked}
    path = tmp_path / run_file_name(ROW, "local")
    write_run_file(path, list(ranked), list(ranked.values()), [[1.0 - 0.01 * r for r in range(len(d))] for d in ranked.values()],
                   task_id=ROW.task_id)
    assert read_run(path) == ranked
    hits = load_hits(tmp_path, "local", lambda row: qrels)
    assert list(hits) == [ROW.name] and hits[ROW.name].sum() == 8
    assert 100 * hits[ROW.name].mean() == pytest.approx(evaluate_row(ROW, ranked, qrels).headline)
    assert load_hits(tmp_path, "global", lambda row: qrels) is None


def test_intervals_cover_the_estimate_and_shrink_with_more_queries():
    rng = np.random.default_rng(1)
    small = {"a": (rng.random(24) < 0.5).astype(float), "b": (rng.random(24) < 0.3).astype(float)}
    large = {"a": (rng.random(2400) < 0.5).astype(float), "b": (rng.random(2400) < 0.3).astype(float)}
    for hits in (small, large):
        interval = average_interval(hits)
        assert interval.low < interval.estimate < interval.high
        assert interval.estimate == pytest.approx(100 * np.mean([h.mean() for h in hits.values()]))
    assert (average_interval(large).high - average_interval(large).low) < (average_interval(small).high - average_interval(small).low) / 5


def test_improves_only_when_the_paired_difference_excludes_zero():
    rng = np.random.default_rng(2)
    base = {"a": (rng.random(24) < 0.5).astype(float)}
    one_more = {"a": base["a"].copy()}
    one_more["a"][np.flatnonzero(base["a"] == 0)[0]] = 1.0  # +4.2 points: one query of 24
    much_better = {"a": np.ones(24)}
    noisy = paired_difference(one_more, base)
    assert noisy.estimate == pytest.approx(100 / 24)
    assert verdict(noisy, "base").startswith("is within noise of base")
    assert verdict(paired_difference(much_better, base), "base").startswith("improves on base")
    assert verdict(paired_difference(base, much_better), "x").startswith("is worse than x")
    assert paired_difference({"a": np.ones(5)}, base) is None


def test_summary_table_shows_intervals_and_noise():
    rng = np.random.default_rng(3)
    hits = {"a": (rng.random(24) < 0.5).astype(float)}
    better = {"a": np.minimum(1, hits["a"] + (rng.random(24) < 0.1))}
    stages = [StageResult("before", None, {"local": {"average": 100 * hits["a"].mean()}}, [], {"local": hits}),
              StageResult("after", "before", {"local": {"average": 100 * better["a"].mean()}}, [], {"local": better})]
    table = summary_table(stages)
    assert "[" in table.splitlines()[1] and "95% CI" in table and "within noise of before" in table


def _stage(name: str, parent: str | None, hits: dict) -> StageResult:
    average = 100 * np.mean([h.mean() for h in hits.values()])
    return StageResult(name, parent, {pool: {"average": average, "rows": {}} for pool in ("local", "global")}, [],
                       {"local": hits, "global": hits})


def test_recipe_verdict_answers_in_one_line_and_names_stages_that_did_not_help(tmp_path):
    rng = np.random.default_rng(4)
    untrained = {"a": (rng.random(96) < 0.2).astype(float), "b": (rng.random(96) < 0.2).astype(float)}
    trained = {name: np.maximum(values, rng.random(96) < 0.6) for name, values in untrained.items()}
    stages = [_stage("untrained", None, untrained), _stage("trained", "untrained", trained),
              _stage("final", "trained", trained), _stage("final + rerank", "final", trained)]
    line = recipe_verdict(stages, start="untrained", final="final")
    assert line.startswith("**The recipe worked**: final beats untrained beyond noise (local +")
    assert "\n" not in line and line.endswith("over the one before: final, final + rerank.")
    assert recipe_verdict(stages[:1] + [_stage("final", "untrained", untrained)], "untrained", "final").startswith(
        "**Not shown**")
    worse = [_stage("untrained", None, trained), _stage("final", "untrained", untrained)]
    assert recipe_verdict(worse, "untrained", "final").startswith("**The recipe did NOT work**")
    assert recipe_verdict(stages[:1], "untrained", "final").startswith("**Did the recipe work? Unknown**")
    report = write_stage_report(tmp_path, stages, title="t", notes=["a note"], headline=line)
    assert report.read_text().splitlines()[2] == line


def test_an_unchanged_stage_reads_plus_zero_not_minus_zero():
    """A reranker that reorders nothing leaves a float difference like -1e-17: "+0.00", never "-0.00"."""
    hits = {"a": np.array([1.0, 0.0, 1.0]), "b": np.array([0.0, 1.0, 0.0])}
    same = {"a": hits["a"] + 0.0, "b": hits["b"] + 0.0}
    text = verdict(paired_difference(same, hits), "distill")
    assert text == "is within noise of distill (+0.00, 95% CI [+0.00, +0.00])"
    assert str(paired_difference(same, hits)) == "0.00 [0.00, 0.00]"
    from umarvel.evaluation.significance import Interval

    assert verdict(Interval(-1e-17, -1e-17, 0.0), "x") == "is within noise of x (+0.00, 95% CI [+0.00, +0.00])"
    assert "-0.00" not in str(Interval(-1e-17, -0.001, 0.004))
