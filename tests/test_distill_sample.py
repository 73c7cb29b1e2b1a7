"""Distillation's query sample, per task as the official code draws it (issue 26, item 4).

A toy union file with tasks of 3, 10 and 25 distinct queries (the smallest one upsampled, as the
union train file repeats small datasets): per task, floor(fraction x n) as the official
`len(qids) // 10`, but at least one; uniform, round(fraction x all) over the whole file.
"""
from __future__ import annotations

from collections import Counter

import pytest

from mini_mbeir import query, write_jsonl
from umarvel.config import load_config
from umarvel.data.mbeir import open_queries
from umarvel.retrieval.teacher import sample_query_rows

SIZES = {"webqa_task1": ("2", 3), "mscoco_task0": ("9", 10), "visualnews_task0": ("0", 25)}


@pytest.fixture
def queries(tmp_path):
    records = []
    for row, (dataset, n) in SIZES.items():
        records += [query(row, f"{dataset}:{i}", f"query {i}", [f"{dataset}:{1000 + i}"]) for i in range(n)]
    records += records[:3]  # upsampled: webqa's three qids twice
    write_jsonl(tmp_path / "union.jsonl", records)
    return open_queries(tmp_path / "union.jsonl", tmp_path, upsampled=True)


def _per_task(queries, rows) -> dict[str, int]:
    return dict(Counter(queries.record(r)["qid"].split(":")[0] for r in rows))


@pytest.mark.parametrize("fraction, expected", [
    (0.1, {"2": 1, "9": 1, "0": 2}),   # 3 -> 0 raised to 1; 10 -> 1; 25 -> 2
    (0.3, {"2": 1, "9": 3, "0": 7}),   # 25 x 0.3 = 7.5: floored as the official code, not rounded to 8
    (0.15, {"2": 1, "9": 1, "0": 3}),  # 5 in all, where a uniform draw takes round(5.7) = 6
    (0.5, {"2": 1, "9": 5, "0": 12}),  # 18 in all, where a uniform draw takes 19
    (1.0, {"2": 3, "9": 10, "0": 25}),  # every distinct qid once, never a repeated row
])
def test_per_task_counts(queries, fraction, expected):
    rows = sample_query_rows(queries, fraction, seed=42)
    assert _per_task(queries, rows) == expected
    assert len({queries.record(r)["qid"] for r in rows}) == len(rows)


def test_per_task_is_the_default_and_uniform_draws_over_the_file(queries):
    assert sample_query_rows(queries, 0.3, 42) == sample_query_rows(queries, 0.3, 42, "per_task")
    uniform = sample_query_rows(queries, 0.3, 42, "uniform")
    assert len(uniform) == round(0.3 * 38) == 11
    assert load_config(None).distill.sample == "per_task"


def test_a_task_draw_does_not_depend_on_the_other_tasks(queries, tmp_path):
    small = [r for r in sample_query_rows(queries, 0.3, 42) if queries.record(r)["qid"].startswith("0:")]
    alone = tmp_path / "alone.jsonl"
    write_jsonl(alone, [query("visualnews_task0", f"0:{i}", f"query {i}", [f"0:{1000 + i}"]) for i in range(25)])
    only = open_queries(alone, tmp_path, upsampled=True)
    assert [queries.record(r)["qid"] for r in small] == [only.record(r)["qid"] for r in sample_query_rows(only, 0.3, 42)]
