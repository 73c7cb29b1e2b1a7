"""`umarvel data validate`: passes on the synthetic set, names every problem of a broken one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from umarvel.cli import main
from umarvel.data.mbeir import MBEIR
from umarvel.data.synthetic import write_synthetic
from umarvel.data.tasks import EVAL_ROWS_BY_NAME
from umarvel.data.validate import validate
from umarvel.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, seed=0, size="tiny")
    return out


def _edit_line(path: Path, line: int, edit) -> None:
    """Replace 1-based `line` of a jsonl file by edit(record) (a dict, or raw text)."""
    lines = path.read_text().splitlines()
    new = edit(json.loads(lines[line - 1]))
    lines[line - 1] = new if isinstance(new, str) else json.dumps(new)
    path.write_text("\n".join(lines) + "\n")


def _record(path: Path, line: int) -> dict:
    return json.loads(path.read_text().splitlines()[line - 1])


def test_synthetic_set_validates(data_dir, capsys):
    report = validate(data_dir)
    assert report.ok, "\n".join(map(str, report.errors))
    assert main(["data", "validate", "--data", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "mscoco_task3" in out and "OK" in out


def test_every_problem_is_reported_with_file_line_and_field(data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    root = broken / "M-BEIR"
    cirr_pool = root / EVAL_ROWS_BY_NAME["cirr_task7"].local_pool_file()
    webqa_pool = root / EVAL_ROWS_BY_NAME["webqa_task1"].local_pool_file()
    coco_test = root / EVAL_ROWS_BY_NAME["mscoco_task0"].query_file("test")
    nights_test = root / EVAL_ROWS_BY_NAME["nights_task4"].query_file("test")
    oven_test = root / EVAL_ROWS_BY_NAME["oven_task6"].query_file("test")
    edis_qrels = root / EVAL_ROWS_BY_NAME["edis_task2"].qrels_file("test")

    _edit_line(webqa_pool, 1, lambda r: "{\"did\": \"2:0\", ")
    _edit_line(webqa_pool, 2, lambda r: {k: v for k, v in r.items() if k != "did"})
    _edit_line(webqa_pool, 3, lambda r: {**r, "modality": "video"})
    _edit_line(webqa_pool, 5, lambda r: {**r, "did": _record(webqa_pool, 4)["did"]})
    _edit_line(coco_test, 1, lambda r: {**r, "task_id": "0"})
    _edit_line(coco_test, 2, lambda r: {**r, "task_id": 5})
    _edit_line(coco_test, 3, lambda r: {**r, "qid": _record(coco_test, 4)["qid"]})
    _edit_line(coco_test, 4, lambda r: {**r, "pos_cand_list": ["9:99999"]})
    _edit_line(nights_test, 1, lambda r: {**r, "query_img_path": "../../outside.jpg"})
    (root / _record(nights_test, 2)["query_img_path"]).unlink()
    (root / _record(nights_test, 3)["query_img_path"]).write_bytes(b"not a jpeg at all")
    _edit_line(oven_test, 1, lambda r: {**r, "qid": "42:1"})
    _edit_line(cirr_pool, 1, lambda r: {**r, "modality": "text", "txt": "a caption"})
    qrels = edis_qrels.read_text().splitlines()
    qrels[1] = qrels[1].replace(qrels[1].split()[2], "3:77777")
    qrels[2] = "3:1 0 3:2"
    edis_qrels.write_text("\n".join(qrels) + "\n")

    report = validate(broken)
    found = {(Path(e.file).name if e.file else None, e.line, e.field): str(e) for e in report.errors}
    expected = {
        (webqa_pool.name, 1, None): "malformed JSON",
        (webqa_pool.name, 2, "did"): "missing field",
        (webqa_pool.name, 3, "modality"): "unknown modality 'video'",
        (webqa_pool.name, 5, "did"): "duplicate did",
        (coco_test.name, 1, "task_id"): "expected int, got str",
        (coco_test.name, 2, "task_id"): "unknown task id 5",
        (coco_test.name, 4, "qid"): "duplicate qid",
        (coco_test.name, 4, "pos_cand_list"): "did '9:99999' is in no test candidate pool",
        (nights_test.name, 1, "query_img_path"): "outside the data root",
        (nights_test.name, 2, "query_img_path"): "image not found",
        (nights_test.name, 3, "query_img_path"): "cannot be read by PIL",
        (oven_test.name, 1, "qid"): "unknown dataset id 42",
        (cirr_pool.name, 1, "modality"): "a text candidate in the pool of cirr_task7",
        (edis_qrels.name, 2, "did (column 3)"): "is in no test candidate pool",
        (edis_qrels.name, 3, None): "expected 5 columns",
    }
    for key, phrase in expected.items():
        assert key in found, f"not reported: {key} ({phrase}); got {sorted(found)}"
        assert phrase in found[key], found[key]

    assert main(["data", "validate", "--data", str(broken), "--images", "exists"]) == 1
    assert "problem(s) found" in capsys.readouterr().err


def test_missing_required_files_are_reported(data_dir, tmp_path):
    broken = tmp_path / "M-BEIR"
    shutil.copytree(data_dir / "M-BEIR", broken)
    (broken / "instructions/query_instructions.tsv").unlink()
    (broken / EVAL_ROWS_BY_NAME["cirr_task7"].query_file("test")).unlink()
    missing = {Path(e.file).name for e in validate(broken, images="skip").errors if "file not found" in str(e)}
    assert missing == {"query_instructions.tsv", "mbeir_cirr_task7_test.jsonl"}


def test_bad_sources_beside_mbeir_are_reported(data_dir, tmp_path):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    nli = broken / "nli_for_simcse.csv"
    nli.write_text(nli.read_text() + "only one column\n")
    (broken / "cc3m/images/GCC_train_000000000.jpg").unlink()
    errors = validate(broken, images="exists").errors
    assert any(Path(e.file).name == "nli_for_simcse.csv" and "columns" in str(e) for e in errors)
    assert {Path(e.file).name for e in errors if "image not found" in str(e)} == {"llava_cc3m.json", "pairs.jsonl"}


# ---- qrels: validate reports a line where evaluation's reader refuses it ----------------------

QRELS_ROW = "edis_task2"  # synthetic tiny: lines 1-4 are `3:6 0 3:12 1 2` .. `3:9 0 3:18 1 2`, one per query


@pytest.fixture
def qrels_tree(data_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "M-BEIR"
    shutil.copytree(data_dir / "M-BEIR", root)
    return root


def _edit_qrels(root: Path, edit) -> Path:
    """The row's test qrels with its lines (as lists of cells) replaced by edit(lines)."""
    path = root / EVAL_ROWS_BY_NAME[QRELS_ROW].qrels_file("test")
    lines = edit([line.split() for line in path.read_text().splitlines()])
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _refused_alike(root: Path, path: Path, line: int, field: str | None, phrase: str) -> None:
    """`data validate` names path:line (field), and the reader evaluation uses refuses the same."""
    reported = [e for e in validate(root, images="skip").errors if e.file == str(path)]
    assert [(e.line, e.field) for e in reported] == [(line, field)], "\n".join(map(str, reported))
    assert str(reported[0]).startswith(f"{path}:{line}: ") and phrase in str(reported[0]), str(reported[0])
    with pytest.raises(DataError) as refused:
        MBEIR(root).qrels("test", QRELS_ROW)
    assert (refused.value.file, refused.value.line, refused.value.field) == (str(path), line, field), str(refused.value)
    assert phrase in str(refused.value)


@pytest.mark.parametrize("column", [1, 2, 3, 4, 5])
def test_a_tab_separated_qrels_line_with_an_empty_field_is_named(qrels_tree, column):
    """An empty cell of a TSV line is that field missing (whitespace splitting used to drop it
    and report only a column count), also as the line's first or last cell."""
    path = _edit_qrels(qrels_tree, lambda lines: [*map(" ".join, lines[:1]),
                                                  "\t".join("" if i == column - 1 else c for i, c in enumerate(lines[1])),
                                                  *map(" ".join, lines[2:])])
    field = ("qid (column 1)", "iteration (column 2)", "did (column 3)", "relevance (column 4)", "task_id (column 5)")
    _refused_alike(qrels_tree, path, 2, field[column - 1], "missing field")


def test_a_qrels_line_short_of_a_field_is_named(qrels_tree):
    path = _edit_qrels(qrels_tree, lambda lines: [" ".join(c for i, c in enumerate(line) if (n, i) != (2, 3))
                                                  for n, line in enumerate(lines, 1)])
    _refused_alike(qrels_tree, path, 2, None, "expected 5 columns 'qid 0 did relevance task_id', got 4")


@pytest.mark.parametrize("relevance", ["0", "-1"])
def test_a_query_judged_only_not_relevant_is_named_at_its_qrels_line(qrels_tree, relevance):
    """Its only line judges its positive not relevant: the query could only score 0. The line to
    fix is that qrels line (before: only the query's line was named, in both readers)."""
    path = _edit_qrels(qrels_tree, lambda lines: [" ".join(relevance if (n, i) == (3, 3) else c for i, c in enumerate(line))
                                                  for n, line in enumerate(lines, 1)])
    _refused_alike(qrels_tree, path, 3, "relevance (column 4)", "query '3:8' has no line with relevance > 0")


def test_judgments_of_non_relevance_beside_positives_are_not_errors(qrels_tree):
    """A relevance-0 line for a query that has a positive, or for a qid of no query, changes no
    recall: evaluation reads it, so validate must not call it a problem (one rule for both)."""
    path = _edit_qrels(qrels_tree, lambda lines: [*map(" ".join, lines), "3:6 0 3:14 0 2", "3:99999 0 3:12 0 2"])
    assert not [e for e in validate(qrels_tree, images="skip").errors if e.file == str(path)]
    assert MBEIR(qrels_tree).qrels("test", QRELS_ROW)["3:6"] == {"3:12"}
