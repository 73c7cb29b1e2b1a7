"""Evaluation artifacts: results.json, results.md/.csv (beside the paper's numbers when the
data is M-BEIR itself), a bar chart, and run files in the reference format; for any other
protocol benchmark, its metrics in results.json/.md and a chart (`write_metrics_report`).
Everything is written atomically (umarvel.io).

A partial evaluation (fewer than the 16 rows) is reported over the rows present; its average
is labelled as such, because it is not comparable to the paper's 16-row "Avg.". On data that
is not M-BEIR (other pool sizes: the synthetic benchmark, a subset) no paper number is shown.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from umarvel.data.tasks import EVAL_ROWS, EvalRow
from umarvel.evaluation.metrics import RowResult, headline_average
from umarvel.evaluation.reference import (
    DEFAULT_COLUMNS, PAPER, PAPER_AVERAGES, PAPER_HEADLINES, PAPER_TABLES, POOLS, pool_size_mismatches,
)
from umarvel.io import atomic_path, atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_CSV = "results.csv"
RESULTS_PNG = "results.png"


def write_report(
    out_dir: str | os.PathLike,
    pool: str,
    results: Iterable[RowResult],
    *,
    pool_sizes: dict[str, int],
    paper_columns: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write results.json, results.md, results.csv and results.png into `out_dir`.

    `pool_sizes` (row -> candidates in its local pool) tell M-BEIR from other data; only on
    M-BEIR are the paper's columns shown, `paper_columns` of them (default: DEFAULT_COLUMNS[pool]).
    Returns the written paths keyed by file name.
    """
    mismatches = pool_size_mismatches(pool_sizes) if pool_sizes else ["no pool sizes given"]
    table = _Table(pool, results, paper_columns, mismatches)
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in (RESULTS_JSON, RESULTS_MD, RESULTS_CSV, RESULTS_PNG)}
    atomic_write_json(paths[RESULTS_JSON], results_dict(pool, table.results))
    atomic_write_text(paths[RESULTS_MD], table.markdown())
    atomic_write_text(paths[RESULTS_CSV], table.csv())
    table.write_chart(paths[RESULTS_PNG])
    return paths


def results_dict(pool: str, results: Iterable[RowResult]) -> dict:
    """The results.json content: percent numbers rounded to 2 decimals, rows in benchmark order."""
    _check_pool(pool)
    results = _ordered(results)
    out = {
        "pool": pool,
        "rows": {
            r.row.name: {
                "headline": round(r.headline, 2),
                "metric": r.row.headline,
                "recall": {f"R@{k}": round(value, 2) for k, value in sorted(r.recall.items())},
                "queries": r.queries,
            }
            for r in results
        },
        "average": round(headline_average(results), 2),
    }
    if len(results) < len(EVAL_ROWS):
        out["note"] = _partial_note(len(results))
    return out


def run_file_name(row: EvalRow, pool: str) -> str:
    """One run file per row and pool, named after the row's M-BEIR test files."""
    return f"mbeir_{row.name}_test_{pool}_run.txt"


def write_run_file(
    path: str | os.PathLike,
    qids: Sequence[str],
    ranked_dids: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    task_id: int | None,
    run_id: str = "umarvel",
) -> None:
    """Reference run format: `qid Q0 did rank score run_id task_id`, one line per retrieved
    candidate, ranks from 1, scores with 6 decimals; queries in the given order. Without a
    task id the line ends at run_id (the TREC run format)."""
    if not len(qids) == len(ranked_dids) == len(scores):
        raise ValueError(
            f"qids ({len(qids)}), ranked_dids ({len(ranked_dids)}) and scores ({len(scores)}) differ in length"
        )
    _check_token("run_id", run_id)
    tail = "" if task_id is None else f" {task_id}"
    with atomic_path(path) as tmp, open(tmp, "w") as out:
        for qid, dids, row_scores in zip(qids, ranked_dids, scores):
            _check_token("qid", qid)
            if len(dids) != len(row_scores):
                raise ValueError(f"query {qid}: {len(dids)} dids but {len(row_scores)} scores")
            for rank, (did, score) in enumerate(zip(dids, row_scores), start=1):
                _check_token("did", did)
                out.write(f"{qid} Q0 {did} {rank} {score:.6f} {run_id}{tail}\n")


def write_metrics_report(out_dir: str | os.PathLike, benchmark, metrics: Mapping[str, float]) -> dict[str, Path]:
    """results.json, results.md and results.png of a protocol benchmark's metrics (percent).

    The paper's number stands beside ours only when the benchmark says its data is the
    published set (`is_real_data`); otherwise the report says why it is left out.
    """
    out_dir = Path(out_dir)
    paper = {name: benchmark.paper[name] for name in metrics if name in benchmark.paper} if benchmark.is_real_data else {}
    paths = {name: out_dir / name for name in (RESULTS_JSON, RESULTS_MD, RESULTS_PNG)}
    record = {"benchmark": benchmark.name, "metrics": {name: round(value, 2) for name, value in metrics.items()},
              "real_data": benchmark.is_real_data}
    if paper:
        record["paper"] = paper
    elif not benchmark.is_real_data:
        record["note"] = NOT_REAL_DATA
    atomic_write_json(paths[RESULTS_JSON], record)
    header = ["metric", "ours", *(["paper", "ours - paper"] if paper else [])]
    lines = [f"# {benchmark.name}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, value in metrics.items():
        compared = [f"{paper[name]:.1f}", f"{value - paper[name]:+.2f}"] if name in paper else ["", ""] if paper else []
        lines.append(f"| {name} | {value:.2f} | " + "".join(f"{cell} | " for cell in compared))
    lines += ["", NOT_REAL_DATA if not benchmark.is_real_data else f"The paper's numbers are from {PAPER}."]
    atomic_write_text(paths[RESULTS_MD], "\n".join(lines) + "\n")
    series = [("ours", list(metrics.values()))]
    if paper:
        series.append(("paper", [paper.get(name, 0.0) for name in metrics]))
    _bar_chart(paths[RESULTS_PNG], list(metrics), series, "percent", benchmark.name)
    return paths


NOT_REAL_DATA = ("The paper's numbers are not shown: this data is not the published set (a fixture, a subset or "
                 "another release), so no number here compares to the paper's.")


def _bar_chart(path: Path, labels: list[str], series: list[tuple[str, list[float]]], ylabel: str, title: str) -> None:
    """Grouped bars, one group per label, one bar per series."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    width = 0.8 / len(series)
    figure = Figure(figsize=(max(6.0, 0.75 * len(labels) + 2), 4.8), layout="constrained")
    axes = figure.subplots()
    for position, (name, values) in enumerate(series):
        shift = (position - (len(series) - 1) / 2) * width
        axes.bar([i + shift for i in range(len(labels))], values, width, label=name)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


class _Table:
    """Our headline numbers beside the chosen paper columns (none when `mismatches` says the
    pools are not M-BEIR's), for the md, csv and png outputs."""

    def __init__(self, pool: str, results: Iterable[RowResult], paper_columns: Sequence[str] | None,
                 mismatches: list[str]):
        _check_pool(pool)
        columns = tuple(DEFAULT_COLUMNS[pool] if paper_columns is None else paper_columns)
        unknown = [c for c in columns if c not in PAPER_HEADLINES[pool]]
        if unknown:
            raise ValueError(f"no paper column {unknown} for the {pool} pool; known: {sorted(PAPER_HEADLINES[pool])}")
        self.mismatches = mismatches
        self.pool, self.columns, self.results = pool, () if mismatches else columns, _ordered(results)
        self.complete = len(self.results) == len(EVAL_ROWS)
        self.average = headline_average(self.results)

    def paper(self, column: str, row: EvalRow) -> float:
        return PAPER_HEADLINES[self.pool][column][row.name]

    def paper_average(self, column: str) -> float:
        """The published Avg., or the paper's mean over the same rows for a partial evaluation."""
        if self.complete:
            return PAPER_AVERAGES[self.pool][column]
        return sum(self.paper(column, r.row) for r in self.results) / len(self.results)

    def average_label(self) -> str:
        return "Avg." if self.complete else f"Avg. ({len(self.results)} of {len(EVAL_ROWS)} rows)"

    def markdown(self) -> str:
        first = self.columns[0] if self.columns else None
        compared = [*(f"paper {c}" for c in self.columns), *([f"ours - {first}"] if first else [])]
        header = ["row", "metric", "queries", "ours", *compared, "recall"]
        lines = [
            f"# M-BEIR test, {self.pool} pool",
            "",
            "| " + " | ".join(header) + " |",
            "|---|---|---:|---:|" + "---:|" * len(compared) + "---|",
        ]
        for r in self.results:
            cells = [f"{self.paper(c, r.row):.1f}" for c in self.columns]
            if first:
                cells.append(f"{r.headline - self.paper(first, r.row):+.2f}")
            recall = ", ".join(f"R@{k} {v:.2f}" for k, v in sorted(r.recall.items()))
            lines.append(f"| {r.row.name} | {r.row.headline} | {r.queries} | {r.headline:.2f} | "
                         + "".join(f"{cell} | " for cell in cells) + f"{recall} |")
        cells = [f"{self.paper_average(c):.2f}" for c in self.columns]
        if first:
            cells.append(f"{self.average - self.paper_average(first):+.2f}")
        lines.append(f"| **{self.average_label()}** | | | **{self.average:.2f}** | " + "".join(f"{c} | " for c in cells) + " |")
        lines.append("")
        lines.append("Recall@k is the percentage of queries with a relevant candidate in the top k.")
        if self.mismatches:
            lines.append(
                "The paper's numbers are not shown: these pools are not M-BEIR's published ones "
                f"({'; '.join(self.mismatches[:3])}{'; ...' if len(self.mismatches) > 3 else ''}), "
                "so no number here compares to the paper's."
            )
        else:
            lines.append(f"The paper's numbers are its headline metric per row ({PAPER}, {PAPER_TABLES[self.pool]}).")
        if not self.complete:
            lines.append("")
            same_rows = " The paper columns are averaged over the same rows." if self.columns else ""
            lines.append(f"Note: {_partial_note(len(self.results))}{same_rows}")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        ks = sorted({k for r in self.results for k in r.recall})
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        paper_header = [f"paper_{c}" for c in self.columns]
        writer.writerow(["row", "metric", "queries", "ours", *paper_header, *(f"R@{k}" for k in ks)])
        for r in self.results:
            writer.writerow(
                [r.row.name, r.row.headline, r.queries, f"{r.headline:.2f}"]
                + [f"{self.paper(c, r.row):.1f}" for c in self.columns]
                + [f"{r.recall[k]:.2f}" if k in r.recall else "" for k in ks]
            )
        writer.writerow(
            [self.average_label(), "", "", f"{self.average:.2f}"]
            + [f"{self.paper_average(c):.2f}" for c in self.columns]
            + [""] * len(ks)
        )
        return buffer.getvalue()

    def write_chart(self, path: Path) -> None:
        """Grouped bars per row (and the average): ours, then each paper column."""
        labels = [r.row.name for r in self.results] + [self.average_label()]
        series = [("ours", [r.headline for r in self.results] + [self.average])]
        series += [
            (f"paper {c}", [self.paper(c, r.row) for r in self.results] + [self.paper_average(c)]) for c in self.columns
        ]
        _bar_chart(path, labels, series, "headline recall (%)", f"M-BEIR test, {self.pool} pool")


def _ordered(results: Iterable[RowResult]) -> list[RowResult]:
    """Results in the benchmark's row order; an empty or duplicated row set is an error."""
    results = list(results)
    names = [r.row.name for r in results]
    if not results:
        raise ValueError("no row results to report")
    if len(set(names)) != len(names):
        raise ValueError(f"a row is reported twice: {sorted(names)}")
    order = {row.name: position for position, row in enumerate(EVAL_ROWS)}
    unknown = [name for name in names if name not in order]
    if unknown:
        raise ValueError(f"not M-BEIR evaluation rows: {unknown}")
    return sorted(results, key=lambda r: order[r.row.name])


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def _partial_note(rows: int) -> str:
    return f"average over {rows} of {len(EVAL_ROWS)} rows, not comparable to the paper's 16-row Avg."


def _check_token(field: str, value: str) -> None:
    """Run files are whitespace-separated: an id with whitespace would shift every column."""
    if not value or any(c.isspace() for c in str(value)):
        raise ValueError(f"{field} {value!r} is empty or contains whitespace; it cannot go in a run file")
