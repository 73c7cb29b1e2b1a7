"""The M-BEIR reader: round trip on the synthetic set, instructions, formatting, bad input."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from umarvel.data.mbeir import (
    MBEIR, Instructions, MBEIRTrainPairs, NegativeSelection, format_query_text, format_text, open_pool, open_queries,
    resolve_under, split_query_text,
)
from umarvel.data.sources import read_hard_negatives, write_hard_negatives
from umarvel.data.synthetic import write_synthetic
from umarvel.data.tasks import EVAL_ROWS, TASKS
from umarvel.errors import DataError


@pytest.fixture(scope="module")
def mbeir_root(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, size="tiny")


@pytest.fixture
def mbeir(mbeir_root, tmp_path) -> MBEIR:
    return MBEIR(mbeir_root, cache_dir=tmp_path / "cache")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_round_trip_every_row(mbeir, mbeir_root):
    for row in EVAL_ROWS:
        queries, pool = mbeir.queries("test", row), mbeir.local_pool(row)
        raw = _jsonl(mbeir_root / row.query_file("test"))
        assert len(queries) == len(raw) > 0
        assert len(pool) == len(_jsonl(mbeir_root / row.local_pool_file()))
        qrels = mbeir.qrels("test", row)
        query_modality, cand_modality = TASKS[row.task_id]
        for index, record in enumerate(raw):
            item = queries.item(index)
            assert item["qid"] == record["qid"] and item["task_id"] == row.task_id
            assert item["modality"] == query_modality
            assert (item["text"] is not None) == ("text" in query_modality.split(","))
            assert (item["image"] is not None) == ("image" in query_modality.split(","))
            assert item["image"] is None or Path(item["image"]).is_file()
            assert item["instruction"] in mbeir.instructions.options(row.dataset_id, query_modality, cand_modality)
            assert qrels[record["qid"]] == set(record["pos_cand_list"])
            local = [did for did in record["pos_cand_list"] if did in pool]
            assert local, f"{row.name}: query {record['qid']} has no positive in its local pool"
            for did in local:
                candidate = pool.get(did)
                assert candidate["did"] == did and candidate["modality"] == cand_modality
                assert candidate["instruction"] is None


def test_global_pools_hold_every_local_candidate(mbeir):
    union = mbeir.global_pool("test")
    for row in EVAL_ROWS:
        local = mbeir.local_pool(row)
        assert all(did in union for did in local.dids().to_pylist())
    assert sum(len(mbeir.local_pool(row)) for row in EVAL_ROWS) == len(union)


def test_train_queries_union_and_per_dataset(mbeir):
    union = mbeir.queries("train")
    mscoco = mbeir.queries("train", dataset="mscoco")
    assert {mscoco.record(i)["task_id"] for i in range(len(mscoco))} == {0, 3}
    assert union.find(mscoco.record(0)["qid"]) is not None
    pool = mbeir.global_pool("train")
    assert all(did in pool for i in range(len(union)) for did in union.record(i)["pos_cand_list"])


def test_eval_instruction_is_a_stable_function_of_the_qid(mbeir_root, tmp_path):
    row = EVAL_ROWS[0]
    first = [q["instruction"] for q in MBEIR(mbeir_root, cache_dir=tmp_path / "a").queries("test", row).items()]
    again = [q["instruction"] for q in MBEIR(mbeir_root, cache_dir=tmp_path / "b").queries("test", row).items()]
    assert first == again
    instructions = Instructions.load(mbeir_root / "instructions/query_instructions.tsv")
    chosen = {instructions.choose(f"0:{i}", 0) for i in range(200)}
    assert len(chosen) == 4, "different qids must spread over the four instructions"


def test_eval_instruction_does_not_depend_on_the_hash_seed(mbeir_root):
    code = (
        "import sys; from umarvel.data.mbeir import Instructions; "
        "i = Instructions.load(sys.argv[1]); print([i.choose(f'9:{n}', 3) for n in range(50)])"
    )
    tsv = str(mbeir_root / "instructions/query_instructions.tsv")
    outputs = {
        subprocess.run([sys.executable, "-c", code, tsv], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_train_sampling_is_reproducible_under_a_seed(mbeir):
    queries, pool = mbeir.queries("train"), mbeir.global_pool("train")

    def draws(seed: int) -> list:
        pairs = MBEIRTrainPairs(queries, pool, seed=seed)
        return [(p["query"]["instruction"], p["positive"]["did"]) for p in (pairs[i] for i in range(len(pairs)))]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    pairs = MBEIRTrainPairs(queries, pool, seed=1)
    per_epoch = []
    for epoch in range(12):
        pairs.set_epoch(epoch)
        per_epoch.append(pairs[0]["query"]["instruction"])
    assert len(set(per_epoch)) > 1, "the instruction of a sample must be redrawn across epochs"


def test_train_pairs_pickle_for_dataloader_workers(mbeir):
    pairs = MBEIRTrainPairs(mbeir.queries("train"), mbeir.global_pool("train"), seed=3)
    assert pickle.loads(pickle.dumps(pairs))[4] == pairs[4]


def test_mined_negatives_never_include_a_positive(mbeir, tmp_path):
    queries, pool = mbeir.queries("train"), mbeir.global_pool("train")
    some_dids = pool.dids().to_pylist()[:3]
    records = {}
    for i in range(len(queries)):
        record = queries.record(i)
        negatives = list(dict.fromkeys(record["pos_cand_list"] + some_dids))
        records[record["qid"]] = {"qid": record["qid"], "negatives": negatives, "scores": [0.5] * len(negatives)}
    path = write_hard_negatives(tmp_path / "neg.jsonl", records.values(), model="m", params={"top_k": 3})
    pairs = MBEIRTrainPairs(queries, pool, seed=0, hard_negatives=read_hard_negatives(path, cache_dir=tmp_path),
                            negatives=NegativeSelection(2))
    for i in range(len(pairs)):
        pair = pairs[i]
        negatives = {n["did"] for n in pair["negatives"]}
        assert negatives and not negatives & set(pair["query"]["pos_cand_list"])


@pytest.mark.parametrize("instruction, text", [
    ("Find an image that matches the caption.", "two red circles on the left"),
    ("  retrieve the text  ", "what is this?\n"),
    (None, "a red square"),
    ("Find a caption for this image.", None),
    ("find it", "ends with a period."),
    (None, None),
])
def test_split_query_text_joins_to_the_benchmark_string(instruction, text):
    parts = split_query_text(instruction, text)
    expected = format_text(" ".join(p.strip() for p in (instruction, text) if p and p.strip()))
    assert " ".join(p for p in parts if p) == format_query_text(instruction, text) == expected


def test_format_text_capitalises_and_ends_a_sentence():
    assert format_text(" two red circles\non the left ") == "Two red circles on the left."
    assert format_text("is it red?") == "Is it red?"
    assert split_query_text("find the image.", "two red circles") == ("Find the image.", "two red circles.")
    assert format_text(None) == ""


@pytest.mark.parametrize("bad", ["../outside.jpg", "/etc/passwd", "mbeir_images/../../outside.jpg"])
def test_paths_outside_the_root_are_refused(tmp_path, bad):
    (tmp_path / "outside.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="outside the data root"):
        resolve_under(root, bad)


def test_query_image_outside_the_root_names_file_and_line(tmp_path):
    root = tmp_path / "root"
    (root / "query/test").mkdir(parents=True)
    path = root / "query/test/q.jsonl"
    bad = {"qid": "9:1", "query_txt": None, "query_img_path": "../../etc/passwd", "query_modality": "image",
           "pos_cand_list": ["9:2"], "neg_cand_list": [], "task_id": 3}
    path.write_text(json.dumps({**bad, "qid": "9:0", "query_img_path": "x.jpg"}) + "\n" + json.dumps(bad) + "\n")
    queries = open_queries(path, root, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        queries.item(1, use_instruction=False)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, "query_img_path")


def _pool_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _cand(did: str, txt: str = "a red square") -> str:
    return json.dumps({"txt": txt, "img_path": None, "modality": "text", "did": did})


def test_bad_pool_rows_raise_or_are_skipped_and_counted(tmp_path):
    path = _pool_file(tmp_path / "pool.jsonl", [_cand("1:0"), "{not json", _cand("1:2"), _cand("1:0", "again")])
    with pytest.raises(DataError) as err:
        open_pool(path, tmp_path, cache_dir=tmp_path / "cache")
    assert (err.value.file, err.value.line) == (str(path), 2) and "malformed JSON" in str(err.value)

    pool = open_pool(path, tmp_path, cache_dir=tmp_path / "cache", on_error="skip")
    assert pool.dids().to_pylist() == ["1:0", "1:2"]
    assert [(e.line, e.field) for e in pool.table.errors] == [(2, None), (4, "did")]
    assert "duplicate did '1:0' (first on line 1)" in str(pool.table.errors[1])
    assert pool.get("1:0")["text"] == "A red square."
    with pytest.raises(DataError, match="malformed JSON"):
        open_pool(path, tmp_path, cache_dir=tmp_path / "cache")


def test_a_changed_file_is_read_again(tmp_path):
    path = _pool_file(tmp_path / "pool.jsonl", [_cand("1:0")])
    assert len(open_pool(path, tmp_path, cache_dir=tmp_path / "cache")) == 1
    _pool_file(path, [_cand("1:0"), _cand("1:1")])
    assert len(open_pool(path, tmp_path, cache_dir=tmp_path / "cache")) == 2


def test_missing_positive_is_a_clear_error_or_skipped(mbeir_root, tmp_path):
    path = tmp_path / "queries.jsonl"
    query = {"qid": "1:0", "query_txt": "a red square", "query_img_path": None, "query_modality": "text",
             "pos_cand_list": ["1:0"], "neg_cand_list": [], "task_id": 1}
    path.write_text(json.dumps(query) + "\n" + json.dumps({**query, "qid": "1:1", "pos_cand_list": ["1:99"]}) + "\n")
    pool = open_pool(_pool_file(tmp_path / "pool.jsonl", [_cand("1:0")]), tmp_path, cache_dir=tmp_path / "cache")
    queries = open_queries(path, tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        MBEIRTrainPairs(queries, pool, use_instruction=False)
    assert (err.value.line, err.value.field) == (2, "pos_cand_list")
    pairs = MBEIRTrainPairs(queries, pool, use_instruction=False, on_error="skip")
    assert len(pairs) == 1 and len(pairs.skipped) == 1
    assert pairs[0]["positive"]["did"] == "1:0"


def test_instructions_rng_draw_uses_the_given_rng(mbeir):
    rng_a, rng_b = random.Random(5), random.Random(5)
    draws_a = [mbeir.instructions.choose("9:1", 0, rng_a) for _ in range(20)]
    draws_b = [mbeir.instructions.choose("9:1", 0, rng_b) for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) > 1
