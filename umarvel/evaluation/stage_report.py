"""Compare the recipe's stages: a terminal table, report.md with per-row tables, and PNG plots;
and one run's training curves (`write_training_plot`, the training.png of every run directory).

The report states plainly whether each stage improved on the one it started from, so a stage
that does not help (on synthetic data, say) is visible rather than hidden; with per-query hits
(`significance`) every average carries its 95% bootstrap interval and "improves on" means the
paired difference is larger than its noise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from umarvel.data.tasks import EVAL_ROWS
from umarvel.evaluation.significance import Hits, average_interval, paired_difference, plain_number, verdict
from umarvel.io import atomic_path, atomic_write_text


@dataclass
class StageResult:
    """One evaluated model: its label, the stage it continued from, results per pool, loss curve,
    and per pool the per-query headline hits of each row (for intervals), when known."""

    name: str
    parent: str | None
    results: dict[str, dict]
    losses: list[float]
    hits: dict[str, Hits] = field(default_factory=dict)

    def average(self, pool: str) -> float | None:
        result = self.results.get(pool)
        return None if result is None else result["average"]

    def shown_average(self, pool: str) -> str:
        """`48.44 [40.10, 56.30]` with hits, else the plain average."""
        if pool in self.hits and self.average(pool) is not None:
            return str(average_interval(self.hits[pool]))
        return _fmt(self.average(pool))


def load_results(eval_dir: Path) -> dict[str, dict]:
    """results.json per pool from an eval output dir (one pool at its top, or local/ and global/)."""
    found = {}
    for pool in ("local", "global"):
        for path in (eval_dir / pool / "results.json", eval_dir / "results.json"):
            if path.is_file():
                data = json.loads(path.read_text())
                if data["pool"] == pool:
                    found[pool] = data
                    break
    return found


def load_losses(run_dir: Path | None) -> list[float]:
    if run_dir is None or not (run_dir / "log_history.json").is_file():
        return []
    return [entry["loss"] for entry in json.loads((run_dir / "log_history.json").read_text()) if "loss" in entry]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _verdict(stage: StageResult, by_name: dict[str, StageResult], pool: str) -> str:
    if stage.parent is None or stage.parent not in by_name:
        return ""
    parent = by_name[stage.parent]
    mine, before = stage.average(pool), parent.average(pool)
    if mine is None or before is None:
        return ""
    if pool in stage.hits and pool in parent.hits:
        difference = paired_difference(stage.hits[pool], parent.hits[pool])
        if difference is not None:
            return verdict(difference, stage.parent)
    delta = mine - before
    word = "improves on" if delta > 0.05 else ("matches" if abs(delta) <= 0.05 else "does NOT improve on")
    return f"{word} {stage.parent} ({plain_number(delta, '+.2f')}; no per-query data for an interval)"


def _difference(stage: StageResult, before: StageResult, pool: str):
    if pool in stage.hits and pool in before.hits:
        return paired_difference(stage.hits[pool], before.hits[pool])
    return None


def _within_noise_or_worse(stage: StageResult, by_name: dict[str, StageResult]) -> bool:
    """No pool shows the stage beyond noise above the one it continued from."""
    parent = by_name.get(stage.parent or "")
    differences = [d for pool in ("local", "global") if parent and (d := _difference(stage, parent, pool))]
    return bool(differences) and all(d.low <= 0 for d in differences)


def recipe_verdict(stages: list[StageResult], start: str, final: str) -> str:
    """One line that answers "did the recipe work?": `final` against `start` by the paired
    bootstrap on every pool, and the stages that did not beat the one they continued from."""
    by_name = {s.name: s for s in stages}
    differences = {}
    if start in by_name and final in by_name:
        differences = {pool: d for pool in ("local", "global")
                       if (d := _difference(by_name[final], by_name[start], pool))}
    if not differences:
        return f"**Did the recipe work? Unknown**: no per-query results for both {start} and {final}."
    shown = "; ".join(f"{pool} {plain_number(d.estimate, '+.2f')} points, 95% CI [{plain_number(d.low, '+.2f')}, "
                      f"{plain_number(d.high, '+.2f')}]" for pool, d in differences.items())
    if all(d.low > 0 for d in differences.values()):
        answer = f"**The recipe worked**: {final} beats {start} beyond noise ({shown})"
    elif any(d.high < 0 for d in differences.values()):
        answer = f"**The recipe did NOT work**: {final} is worse than {start} ({shown})"
    else:
        answer = f"**Not shown**: {final} is not beyond noise of {start} on every pool ({shown})"
    idle = [s.name for s in stages if _within_noise_or_worse(s, by_name)]
    if idle:
        answer += f". Stages that did not help beyond noise over the one before: {', '.join(idle)}"
    return answer + "."


def summary_table(stages: list[StageResult]) -> str:
    """The terminal table: rows = stages, columns = local and global averages."""
    by_name = {s.name: s for s in stages}
    lines = [f"{'model':22s} {'local avg [95% CI]':>22s} {'global avg [95% CI]':>22s}  vs. previous stage (local)"]
    for stage in stages:
        lines.append(f"{stage.name:22s} {stage.shown_average('local'):>22s} {stage.shown_average('global'):>22s}  "
                     f"{_verdict(stage, by_name, 'local')}")
    return "\n".join(lines)


def _row_table(stages: list[StageResult], pool: str) -> list[str]:
    present = [s for s in stages if pool in s.results]
    if not present:
        return []
    lines = [f"### {pool.capitalize()} pool, headline metric per row (%)", "",
             "| row | metric | " + " | ".join(s.name for s in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for row in EVAL_ROWS:
        cells = [_fmt(s.results[pool]["rows"].get(row.name, {}).get("headline")) for s in present]
        lines.append(f"| {row.name} | {row.headline} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(f"**{_fmt(s.average(pool))}**" for s in present) + " |")
    return lines + [""]


def write_stage_report(out_dir: Path, stages: list[StageResult], *, title: str, notes: list[str],
                       headline: str = "") -> Path:
    """report.md (`headline` first, when given) + loss.png + recall.png in `out_dir`; returns the
    report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in stages}
    lines = [f"# {title}", "", *([headline, ""] if headline else []), *notes, "", "## Averages", "",
             "Averages with their 95% bootstrap interval over queries; a stage improves on the one it "
             "continued from only when the paired difference's interval excludes 0.", "",
             "| model | local avg [95% CI] | global avg [95% CI] | vs. previous stage (local) | "
             "vs. previous stage (global) |",
             "|---|---|---|---|---|"]
    for stage in stages:
        lines.append(f"| {stage.name} | {stage.shown_average('local')} | {stage.shown_average('global')} | "
                     f"{_verdict(stage, by_name, 'local')} | {_verdict(stage, by_name, 'global')} |")
    lines += ["", "![training loss per stage](loss.png)", "", "![recall per row and stage](recall.png)", ""]
    lines += _row_table(stages, "local") + _row_table(stages, "global")
    _plot_losses(out_dir / "loss.png", stages)
    _plot_recall(out_dir / "recall.png", stages)
    report = out_dir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")


def _plot_losses(path: Path, stages: list[StageResult]) -> None:
    trained = [s for s in stages if s.losses]
    figure = _figure(3.2 * max(len(trained), 1), 2.8)
    for index, stage in enumerate(trained, start=1):
        axis = figure.add_subplot(1, len(trained), index)
        axis.plot(range(1, len(stage.losses) + 1), stage.losses, linewidth=1.2)
        axis.set_title(stage.name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    if trained:
        figure.axes[0].set_ylabel("training loss", fontsize=8)
    _save(figure, path)


def _plot_recall(path: Path, stages: list[StageResult]) -> None:
    present = [s for s in stages if "local" in s.results]
    figure = _figure(12, 4)
    axis = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(present), 1)
    for index, stage in enumerate(present):
        values = [stage.results["local"]["rows"].get(row.name, {}).get("headline", 0.0) for row in EVAL_ROWS]
        axis.bar([i + index * width for i in range(len(EVAL_ROWS))], values, width, label=stage.name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(EVAL_ROWS))])
    axis.set_xticklabels([row.name for row in EVAL_ROWS], rotation=60, ha="right", fontsize=7)
    axis.set_ylabel("local headline recall (%)")
    axis.legend(fontsize=7, ncol=min(len(present), 4))
    _save(figure, path)


# (log key, panel title) of training.png; a panel only when the run logged its key
TRAINING_PANELS = (("loss", "loss"), ("temperature", "temperature"), ("accuracy", "accuracy"))


def write_training_plot(path: Path, log_history: list[dict]) -> None:
    """training.png: loss, temperature and accuracy per logged step, and val recall per
    evaluation (every eval_recall@k of the run), one panel each."""
    panels = [(title, {key: _series(log_history, key)}) for key, title in TRAINING_PANELS
              if any(key in entry for entry in log_history)]
    recall = sorted({key for entry in log_history for key in entry if key.startswith("eval_recall@")},
                    key=lambda key: int(key.split("@")[1]))
    if recall:
        panels.append(("val recall (%)", {key[len("eval_"):]: _series(log_history, key) for key in recall}))
    figure = _figure(3.2 * max(len(panels), 1), 2.8)
    for index, (title, series) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), index)
        for label, (steps, values) in series.items():
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, linewidth=1.2,
                      label=label)
        if len(series) > 1:
            axis.legend(fontsize=7)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
    _save(figure, path)


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    entries = [entry for entry in log_history if key in entry]
    return [entry.get("step", 0) for entry in entries], [entry[key] for entry in entries]
