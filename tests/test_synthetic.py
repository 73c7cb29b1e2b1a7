"""The synthetic benchmark: deterministic, M-BEIR-shaped, and its texts describe its images."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from umarvel.cli import main
from umarvel.data.synthetic import COLOURS, write_synthetic
from umarvel.data.tasks import DATASET_IDS, EVAL_ROWS, EVAL_ROWS_BY_NAME, GLOBAL_POOL, TASKS, UNION_TRAIN_QUERIES


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, seed=0, size="tiny")
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(out, tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "again"), "--seed", "0", "--size", "tiny"]) == 0
    assert _tree(tmp_path / "again") == _tree(out)
    write_synthetic(tmp_path / "other", seed=1, size="tiny")
    other = _tree(tmp_path / "other")
    assert other["M-BEIR/" + UNION_TRAIN_QUERIES] != _tree(out)["M-BEIR/" + UNION_TRAIN_QUERIES]


def test_every_row_has_the_task_structure(out):
    root = out / "M-BEIR"
    for row in EVAL_ROWS:
        query_modality, cand_modality = TASKS[row.task_id]
        for split in ("val", "test"):
            queries = _jsonl(root / row.query_file(split))
            assert queries and {q["query_modality"] for q in queries} == {query_modality}
            assert {q["qid"].split(":")[0] for q in queries} == {str(row.dataset_id)}
        pool = _jsonl(root / row.local_pool_file())
        assert {c["modality"] for c in pool} == {cand_modality}
        assert {c["did"].split(":")[0] for c in pool} == {str(row.dataset_id)}
    assert {row.task_id for row in EVAL_ROWS} == set(TASKS)


def test_union_pools_and_union_train(out):
    root = out / "M-BEIR"
    local_lines = [line for row in EVAL_ROWS for line in (root / row.local_pool_file()).read_text().splitlines()]
    assert (root / GLOBAL_POOL.format(split="test")).read_text().splitlines() == local_lines
    for split in ("train", "val", "test"):
        dids = [c["did"] for c in _jsonl(root / GLOBAL_POOL.format(split=split))]
        assert len(dids) == len(set(dids))
    per_dataset = [q["qid"] for path in sorted((root / "query/train").glob("*.jsonl")) for q in _jsonl(path)]
    union = Counter(q["qid"] for q in _jsonl(root / UNION_TRAIN_QUERIES))
    assert set(union) == set(per_dataset)
    assert {qid.split(":")[0] for qid, n in union.items() if n > 1} == {str(DATASET_IDS["nights"])}


def test_multi_positive_and_cross_dataset_positives(out):
    root = out / "M-BEIR"
    coco = _jsonl(root / EVAL_ROWS_BY_NAME["mscoco_task3"].query_file("test"))
    assert all(len(q["pos_cand_list"]) == 2 for q in coco)
    for task in (6, 8):
        infoseek = EVAL_ROWS_BY_NAME[f"infoseek_task{task}"]
        oven_pool = {c["did"] for c in _jsonl(root / EVAL_ROWS_BY_NAME[f"oven_task{task}"].local_pool_file())}
        infoseek_pool = {c["did"] for c in _jsonl(root / infoseek.local_pool_file())}
        queries = _jsonl(root / infoseek.query_file("test")) + _jsonl(root / infoseek.query_file("val"))
        cross = [did for q in queries for did in q["pos_cand_list"] if did.startswith("5:")]
        assert cross and all(did in oven_pool and did not in infoseek_pool for did in cross)
        qrels = (root / infoseek.qrels_file("test")).read_text()
        assert any(f" {did} " in qrels for did in cross)


def test_train_queries_name_near_miss_negatives(out):
    queries = _jsonl(out / "M-BEIR" / UNION_TRAIN_QUERIES)
    assert all(q["neg_cand_list"] and not set(q["neg_cand_list"]) & set(q["pos_cand_list"]) for q in queries)


def _colour_share(path: Path, colour: str) -> float:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32).reshape(-1, 3)
    return float((np.abs(pixels - np.array(COLOURS[colour])).sum(axis=1) < 90).mean())


def test_captions_and_edits_describe_the_pictures(out):
    root = out / "M-BEIR"
    checked = 0
    for name in ("mscoco_task0", "fashion200k_task0", "fashioniq_task7", "cirr_task7"):
        row = EVAL_ROWS_BY_NAME[name]
        pool = {c["did"]: c for c in _jsonl(root / row.local_pool_file())}
        for query in _jsonl(root / row.query_file("test")):
            words = query["query_txt"].replace(".", "").split()
            colours = [w for w in words if w in COLOURS]
            if not colours:
                continue
            image = root / pool[query["pos_cand_list"][0]]["img_path"]
            shares = {c: _colour_share(image, c) for c in COLOURS}
            assert max(shares, key=shares.get) == colours[0], (query["query_txt"], shares)
            checked += 1
    assert checked >= 8


def test_instruction_file_has_four_per_row(out):
    with open(out / "M-BEIR/instructions/query_instructions.tsv", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    assert rows[0][:4] == ["query_modality", "cand_modality", "dataset_name", "dataset_id"]
    assert len(rows) == 1 + len(EVAL_ROWS)
    assert all(len([c for c in r[4:] if c]) == 4 for r in rows[1:])


def test_nli_and_cc3m_files(out):
    with open(out / "nli_for_simcse.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["sent0"] != r["sent1"] and r["hard_neg"] for r in rows)
    llava = json.loads((out / "cc3m/llava_cc3m.json").read_text())
    pairs = _jsonl(out / "cc3m/pairs.jsonl")
    assert len(llava) == len(pairs)
    assert all((out / "cc3m/images" / p["image"]).is_file() for p in pairs)
