"""NLI, CC3M, mined negatives and teacher scores: parsed into pairs, bad rows named by line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from umarvel.data.mbeir import MBEIRDistillSet, open_pool, open_queries
from umarvel.data.sources import (
    CC3MPairs, NLIPairs, read_hard_negatives, read_teacher_scores, write_hard_negatives, write_teacher_scores,
)
from umarvel.data.synthetic import write_synthetic
from umarvel.errors import DataError


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path)
    return path


def test_nli_pairs(tmp_path, cache):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\na red circle,"one red, round shape",a blue circle\ntwo stars,a pair of stars,\n')
    pairs = NLIPairs(path, cache_dir=cache)
    assert len(pairs) == 2
    first = pairs[0]
    assert first["query"]["text"] == "A red circle." and first["query"]["qid"] == "nli:2"
    assert first["positive"]["text"] == "One red, round shape."
    assert [n["text"] for n in first["negatives"]] == ["A blue circle."]
    assert pairs[1]["negatives"] == []
    assert first["positive"]["image"] is None and first["positive"]["instruction"] is None


def test_nli_without_hard_negative_column(tmp_path, cache):
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1\na,b\n")
    assert NLIPairs(path, cache_dir=cache)[0]["negatives"] == []


def test_nli_bad_rows_are_named(tmp_path, cache):
    path = tmp_path / "nli.csv"
    path.write_text("sent0,sent1,hard_neg\nfine,also fine,x\nonly one column\n,empty first,x\n")
    with pytest.raises(DataError) as err:
        NLIPairs(path, cache_dir=cache)
    assert (err.value.file, err.value.line) == (str(path), 3) and "columns" in str(err.value)
    pairs = NLIPairs(path, cache_dir=cache, on_error="skip")
    assert len(pairs) == 1 and [(e.line, e.field) for e in pairs.errors] == [(3, None), (4, "sent0")]
    (tmp_path / "bad_header.csv").write_text("premise,hypothesis\na,b\n")
    with pytest.raises(DataError, match="sent0,sent1"):
        NLIPairs(tmp_path / "bad_header.csv", cache_dir=cache)


def test_cc3m_llava_form(tmp_path, cache):
    _image(tmp_path / "images/GCC_train_000000001.jpg")
    _image(tmp_path / "images/GCC_train_000000002.jpg")
    path = tmp_path / "cc3m.json"
    path.write_text(json.dumps({
        "GCC_train_000000001": {"h5v": "/data/somewhere/images/GCC_train_000000001.jpg",
                                "instruct_ans": ["a red square on a table"]},
        "GCC_train_000000002": {"h5v": "x/GCC_train_000000002.jpg", "instruct_ans": ["two dogs"],
                                "instruction": "Find the image.", "pos_text": "dogs playing"},
    }, indent=2))
    pairs = CC3MPairs(path, tmp_path / "images", cache_dir=cache)
    first, second = pairs[0], pairs[1]
    assert first["query"]["text"] == "A red square on a table." and first["query"]["instruction"] is None
    assert first["positive"]["image"] == str(tmp_path / "images/GCC_train_000000001.jpg")
    assert first["positive"]["modality"] == "image" and first["positive"]["text"] is None
    assert second["query"]["instruction"] == "Find the image."
    assert second["positive"]["text"] == "Dogs playing." and second["positive"]["modality"] == "image,text"
    assert first["positive"]["did"] == "cc3m:GCC_train_000000001.jpg"


def test_cc3m_llava_bad_entries_are_named_by_line(tmp_path, cache):
    path = tmp_path / "cc3m.json"
    path.write_text(
        '{\n'
        '  "a": {"h5v": "images/a.jpg", "instruct_ans": ["fine"]},\n'
        '  "b": {"instruct_ans": ["no image"]},\n'
        '  "c": {"h5v": "images/c.jpg", "instruct_ans": []},\n'
        '  "a": {"h5v": "images/a2.jpg", "instruct_ans": ["again"]}\n'
        '}\n'
    )
    pairs = CC3MPairs(path, tmp_path, cache_dir=cache, on_error="skip")
    assert len(pairs) == 1
    assert [(e.line, e.field) for e in pairs.errors] == [(3, "h5v"), (4, "instruct_ans"), (5, None)]
    assert "duplicate id 'a' (first on line 2)" in str(pairs.errors[2])
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "a": {"h5v": "a.jpg", "instruct_ans": ["x"]},\n  "b": {"h5v": \n}\n')
    with pytest.raises(DataError) as err:
        CC3MPairs(broken, tmp_path, cache_dir=cache)
    assert err.value.line == 4 and "malformed JSON" in str(err.value)


def test_cc3m_jsonl_form_and_image_checks(tmp_path, cache):
    _image(tmp_path / "root/sub/ok.jpg")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    path = tmp_path / "pairs.jsonl"
    lines = [{"image": "sub/ok.jpg", "caption": "a red square"}, {"image": "../outside.jpg", "caption": "escape"},
             {"image": "sub/missing.jpg", "caption": "gone"}, {"image": "sub/ok.jpg"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs = CC3MPairs(path, tmp_path / "root", cache_dir=cache, on_error="skip")
    assert [(e.line, e.field) for e in pairs.errors] == [(4, "caption")]
    assert pairs[0]["positive"]["image"] == str(tmp_path / "root/sub/ok.jpg")
    with pytest.raises(DataError) as err:
        pairs[1]
    assert (err.value.line, err.value.field) == (2, "image") and "outside" in str(err.value)
    with pytest.raises(DataError, match="image not found"):
        pairs[2]


def test_synthetic_nli_and_cc3m_read(tmp_path, cache):
    write_synthetic(tmp_path / "data", seed=0, size="tiny")
    nli = NLIPairs(tmp_path / "data/nli_for_simcse.csv", cache_dir=cache)
    assert len(nli) > 0 and nli[0]["negatives"]
    images = tmp_path / "data/cc3m/images"
    llava = CC3MPairs(tmp_path / "data/cc3m/llava_cc3m.json", images, cache_dir=cache)
    jsonl = CC3MPairs(tmp_path / "data/cc3m/pairs.jsonl", images, cache_dir=cache)
    assert [llava[i]["positive"]["image"] for i in range(len(llava))] == \
        [jsonl[i]["positive"]["image"] for i in range(len(jsonl))]


NEGATIVES = [
    {"qid": "9:1", "negatives": ["9:17", "9:4"], "scores": [0.71, 0.69]},
    {"qid": "9:2", "negatives": [], "scores": []},
]


def test_hard_negatives_round_trip(tmp_path, cache):
    params = {"pool": "cand_pool/global/mbeir_union_train_cand_pool.jsonl", "top_k": 50, "threshold": 0.9}
    path = write_hard_negatives(tmp_path / "neg.jsonl", NEGATIVES, model="sha256:abc", params=params)
    assert [p.name for p in tmp_path.iterdir()] == ["neg.jsonl"], "no temporary file may be left behind"
    mined = read_hard_negatives(path, cache_dir=cache)
    assert mined.header["params"] == params and mined.header["model"] == "sha256:abc"
    assert mined.get("9:1") == (["9:17", "9:4"], [0.71, 0.69])
    assert mined.get("9:3") is None and len(mined) == 2
    assert list(mined)[1] == ("9:2", [], [])


@pytest.mark.parametrize("record, field", [
    ({"qid": "9:1", "negatives": ["9:17"], "scores": [0.1, 0.2]}, "scores"),
    ({"qid": "9:1", "negatives": ["9:17", "9:17"], "scores": [0.1, 0.2]}, "negatives"),
    ({"qid": "bad", "negatives": [], "scores": []}, "qid"),
    ({"qid": "9:1", "negatives": [17], "scores": [0.1]}, "negatives"),
])
def test_hard_negative_writer_refuses_bad_records(tmp_path, record, field):
    with pytest.raises(DataError) as err:
        write_hard_negatives(tmp_path / "neg.jsonl", [NEGATIVES[1], record], model="m", params={})
    assert (err.value.line, err.value.field) == (3, field)
    assert not list(tmp_path.iterdir()), "a failed write must leave nothing behind"


def test_hard_negative_reader_rejects_bad_files(tmp_path, cache):
    header = {"format": "umarvel-hard-negatives", "version": 1, "model": "m", "params": {}}
    path = tmp_path / "neg.jsonl"
    path.write_text("\n".join([
        json.dumps(header), json.dumps(NEGATIVES[0]), '{"qid": "9:2", "negatives": ["9:1"], "scores": [NaN]}',
        "not json", json.dumps(NEGATIVES[0]),
    ]) + "\n")
    mined = read_hard_negatives(path, cache_dir=cache, on_error="skip")
    assert len(mined) == 1
    assert [(e.line, e.field) for e in mined.errors] == [(3, "scores"), (4, None), (5, "qid")]
    with pytest.raises(DataError) as err:
        read_hard_negatives(path, cache_dir=cache)
    assert err.value.line == 3
    teacher_header = tmp_path / "teacher.jsonl"
    teacher_header.write_text(json.dumps({**header, "format": "umarvel-teacher-scores"}) + "\n")
    with pytest.raises(DataError, match="not a umarvel-hard-negatives file"):
        read_hard_negatives(teacher_header, cache_dir=cache)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({**header, "version": 0}) + "\n")
    with pytest.raises(DataError, match="unsupported version"):
        read_hard_negatives(old, cache_dir=cache)


def test_teacher_scores_feed_the_distillation_set(tmp_path, cache):
    root = tmp_path
    pool_path = tmp_path / "pool.jsonl"
    pool_path.write_text("".join(
        json.dumps({"txt": f"text {i}", "img_path": None, "modality": "text", "did": f"1:{i}"}) + "\n"
        for i in range(4)
    ))
    query_path = tmp_path / "queries.jsonl"
    query_path.write_text(json.dumps({"qid": "1:0", "query_txt": "text zero", "query_img_path": None,
                                      "query_modality": "text", "pos_cand_list": ["1:0"], "task_id": 1}) + "\n")
    path = write_teacher_scores(tmp_path / "teacher.jsonl",
                                [{"qid": "1:0", "candidates": ["1:0", "1:3"], "scores": [0.9, 0.1]}],
                                model="fused", params={"alpha": 0.5})
    teacher = read_teacher_scores(path, cache_dir=cache)
    distill = MBEIRDistillSet(open_queries(query_path, root, cache_dir=cache), open_pool(pool_path, root, cache_dir=cache),
                              teacher, use_instruction=False)
    sample = distill[0]
    assert sample["query"]["qid"] == "1:0" and sample["teacher_scores"] == [0.9, 0.1]
    assert [c["did"] for c in sample["candidates"]] == ["1:0", "1:3"]
