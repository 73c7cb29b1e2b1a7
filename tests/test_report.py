"""Report artifacts: results.json shape, run-file lines, tables beside the paper, the chart."""
import csv
import json
import statistics

import pytest

from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, PUBLISHED_POOL_SIZES
from umarvel.evaluation.metrics import RowResult
from umarvel.evaluation.reference import PAPER_AVERAGES, PAPER_HEADLINES
from umarvel.evaluation.report import run_file_name, write_report, write_run_file


MBEIR = PUBLISHED_POOL_SIZES  # the pools of M-BEIR itself: the paper's numbers compare


def all_rows():
    """Headline of row i is 40 + i + 0.123 (so rounding shows); other cut-offs differ."""
    return [
        RowResult(row, {k: 40.0 + i + 0.123 + (k - row.headline_k) for k in row.recall_ks}, queries=100 + i)
        for i, row in enumerate(EVAL_ROWS)
    ]


def test_results_json_shape_and_values(tmp_path):
    write_report(tmp_path, "global", reversed(all_rows()), pool_sizes=MBEIR)
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data) == ["pool", "rows", "average"]
    assert data["pool"] == "global"
    assert list(data["rows"]) == [row.name for row in EVAL_ROWS]
    assert data["rows"]["mscoco_task0"] == {
        "headline": 41.12,
        "metric": "R@5",
        "recall": {"R@1": 37.12, "R@5": 41.12, "R@10": 46.12},
        "queries": 101,
    }
    assert data["rows"]["fashion200k_task0"]["metric"] == "R@10"
    assert data["rows"]["fashion200k_task0"]["recall"] == {"R@10": 42.12, "R@20": 52.12, "R@50": 82.12}
    assert data["average"] == round(statistics.mean(40 + i + 0.123 for i in range(16)), 2) == 47.62


def test_partial_evaluation_averages_present_rows_and_says_so(tmp_path):
    rows = all_rows()[:3]
    write_report(tmp_path, "local", rows, pool_sizes=MBEIR)
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data["rows"]) == ["visualnews_task0", "mscoco_task0", "fashion200k_task0"]
    assert data["average"] == 41.12
    assert "3 of 16 rows" in data["note"]
    markdown = (tmp_path / "results.md").read_text()
    assert "Avg. (3 of 16 rows)" in markdown and "not comparable" in markdown
    paper_mean = statistics.mean([47.3, 84.4, 33.6])
    assert f"{paper_mean:.2f}" in markdown


def test_markdown_and_csv_carry_the_papers_numbers(tmp_path):
    write_report(tmp_path, "local", all_rows(), pool_sizes=MBEIR)
    markdown = (tmp_path / "results.md").read_text()
    assert "paper U-MARVEL | paper U-MARVEL+" in markdown
    assert "| mscoco_task0 | R@5 | 101 | 41.12 | 84.4 | 85.6 | -43.28 |" in markdown
    assert "**Avg.** | | | **47.62** | 63.20 | 64.80 |" in markdown
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["row"] for r in table] == [row.name for row in EVAL_ROWS] + ["Avg."]
    for r in table[:-1]:
        assert float(r["paper_U-MARVEL"]) == PAPER_HEADLINES["local"]["U-MARVEL"][r["row"]]
        assert float(r["paper_U-MARVEL+"]) == PAPER_HEADLINES["local"]["U-MARVEL+"][r["row"]]
    assert table[1]["R@1"] == "37.12" and table[1]["R@50"] == ""
    assert float(table[-1]["paper_U-MARVEL"]) == PAPER_AVERAGES["local"]["U-MARVEL"] == 63.2

    write_report(tmp_path / "global", "global", all_rows(), pool_sizes=MBEIR)
    markdown = (tmp_path / "global" / "results.md").read_text()
    assert "| mscoco_task0 | R@5 | 101 | 41.12 | 72.8 | -31.68 |" in markdown
    assert "U-MARVEL+" not in markdown


def test_the_papers_numbers_appear_only_beside_m_beir_itself(tmp_path):
    """The synthetic benchmark (or any subset) has other pools: no paper column, and the reason."""
    synthetic = {**MBEIR, "mscoco_task0": 14}
    write_report(tmp_path / "synthetic", "local", all_rows(), pool_sizes=synthetic)
    markdown = (tmp_path / "synthetic" / "results.md").read_text()
    assert "paper" not in markdown.split("\n\n")[1]  # the table
    assert "| mscoco_task0 | R@5 | 101 | 41.12 | R@1 37.12, R@5 41.12, R@10 46.12 |" in markdown
    assert "not M-BEIR's published ones (mscoco_task0: 14 candidates (M-BEIR: 5,000))" in markdown
    assert "shared/" not in markdown and "84.4" not in markdown
    header = (tmp_path / "synthetic" / "results.csv").read_text().splitlines()[0]
    assert header == "row,metric,queries,ours,R@1,R@5,R@10,R@20,R@50"

    write_report(tmp_path / "mbeir", "local", all_rows(), pool_sizes=MBEIR)
    markdown = (tmp_path / "mbeir" / "results.md").read_text()
    assert "arXiv:2507.14902, Tables 7 and 13" in markdown and "shared/" not in markdown
    chart = (tmp_path / "mbeir" / "results.png").stat().st_size
    assert chart > (tmp_path / "synthetic" / "results.png").stat().st_size  # two more bar series


def test_chart_is_a_valid_png(tmp_path):
    paths = write_report(tmp_path, "local", all_rows()[:5], pool_sizes=MBEIR)
    data = paths["results.png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 200 and height > 200
    assert not list(tmp_path.glob(".*tmp"))


def test_paper_columns_match_the_papers_averages():
    for pool, columns in PAPER_HEADLINES.items():
        for name, headlines in columns.items():
            assert list(headlines) == [row.name for row in EVAL_ROWS]
            assert statistics.mean(headlines.values()) == pytest.approx(PAPER_AVERAGES[pool][name], abs=0.05)


def test_bad_inputs_are_rejected(tmp_path):
    rows = all_rows()
    with pytest.raises(ValueError, match="twice"):
        write_report(tmp_path, "local", [rows[0], rows[0]], pool_sizes=MBEIR)
    with pytest.raises(ValueError, match="pool"):
        write_report(tmp_path, "union", rows, pool_sizes=MBEIR)
    with pytest.raises(ValueError, match="no paper column"):
        write_report(tmp_path, "global", rows, paper_columns=["U-MARVEL+"], pool_sizes=MBEIR)
    assert not list(tmp_path.iterdir())


def test_run_file_lines(tmp_path):
    row = EVAL_ROWS_BY_NAME["cirr_task7"]
    path = tmp_path / run_file_name(row, "local")
    assert path.name == "mbeir_cirr_task7_test_local_run.txt"
    write_run_file(
        path,
        ["8:1", "8:2"],
        [["8:10", "8:11", "8:12"], ["8:12"]],
        [[0.9, 0.5, -0.25], [0.1234567]],
        task_id=row.task_id,
        run_id="umarvel-local",
    )
    assert path.read_text().splitlines() == [
        "8:1 Q0 8:10 1 0.900000 umarvel-local 7",
        "8:1 Q0 8:11 2 0.500000 umarvel-local 7",
        "8:1 Q0 8:12 3 -0.250000 umarvel-local 7",
        "8:2 Q0 8:12 1 0.123457 umarvel-local 7",
    ]


def test_run_file_refuses_ids_that_would_break_columns(tmp_path):
    path = tmp_path / "run.txt"
    with pytest.raises(ValueError, match="whitespace"):
        write_run_file(path, ["8:1"], [["a b"]], [[1.0]], task_id=7)
    with pytest.raises(ValueError, match="differ in length"):
        write_run_file(path, ["8:1", "8:2"], [["a"]], [[1.0]], task_id=7)
    assert not path.exists() and not list(tmp_path.iterdir())
