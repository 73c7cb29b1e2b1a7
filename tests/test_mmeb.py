"""MMEB: the layout reader, the metric against hand-computed values, the score files' keys, the
category / IND / OOD / overall averages, the CLI end to end on the tiny model, and one-line
errors (exit 2) for every bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from mmeb_fixtures import SUBSETS, image, readme, rows, write_mmeb, write_parquet
from umarvel.cli import main
from umarvel.errors import DataError
from umarvel.evaluation import mmeb
from umarvel.evaluation.mmeb import DATASETS, MMEB, REFERENCE, _prediction, averages, score_file
from umarvel.evaluation.mmeb_layout import split_instruction
from umarvel.evaluation.protocol import Ranking

ROOT = Path(__file__).resolve().parents[1]
VLM2VEC_KEYS = {f"{metric}@{k}" for metric in ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1",
                                               "map", "mrr") for k in (1, 5, 10)} | {"num_pred", "num_data"}


@pytest.fixture()
def data(tmp_path):
    return write_mmeb(tmp_path / "mmeb")


def parquet(data: Path, name: str) -> Path:
    return data / "MMEB-eval" / name / "test-00000-of-00001.parquet"


def test_the_36_datasets_in_4_categories_and_the_ind_ood_split():
    categories = [category for category, _ in DATASETS.values()]
    assert len(DATASETS) == 36
    assert {c: categories.count(c) for c in mmeb.CATEGORIES} == {
        "Classification": 10, "VQA": 10, "Retrieval": 12, "Visual Grounding": 4}
    assert len(mmeb.group_members("IND")) == 20 and len(mmeb.group_members("OOD")) == 16
    assert mmeb.group_members("OOD")[:5] == ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"]
    assert set(REFERENCE) == set(DATASETS)


@pytest.mark.parametrize("text, query, expected", [
    ("<|image_1|>\nRepresent the given image for classification", True,
     ("Represent the given image for classification", "")),
    ("<|image_1|>\nRepresent the given image with the following question: What is it: a cat?", True,
     ("Represent the given image with the following question:", "What is it: a cat?")),
    ("Find me an everyday image that matches the given caption: A man.", True,
     ("Find me an everyday image that matches the given caption:", "A man.")),
    ("<|image_1|>\nRepresent the given image.", False, ("Represent the given image.", "")),
    ("<|image_1|>\nSelect the portion of the image that follows the language expressions. man in blue", True,
     ("Select the portion of the image that follows the language expressions.", "man in blue")),
    ("A caption. Two sentences: no instruction", False, ("", "A caption. Two sentences: no instruction")),
    ("Note: a caption with a colon", False, ("", "Note: a caption with a colon")),
    ("a query without instruction", True, ("", "a query without instruction")),
])
def test_instruction_split_of_v1_text(text, query, expected):
    assert split_instruction(text, query) == expected


def test_reader_builds_our_items_from_both_layouts(data):
    benchmark = MMEB(data)
    assert list(benchmark.subsets) == list(SUBSETS)  # CIFAR-100 is in the README but not one of the 36
    cls, t2i, ref = benchmark.subsets["ImageNet-1K"], benchmark.subsets["MSCOCO_t2i"], benchmark.subsets["RefCOCO"]
    assert (cls.layout, ref.layout) == ("V1", "V2")
    assert cls.queries[1] == {"id": "1", "image": str(data / "eval_images" / "ImageNet-1K" / "green.png"),
                              "instruction": "Represent the given image for classification"}
    assert [c["text"] for c in cls.candidates.values()] == ["red", "green", "blue"]
    assert cls.rows[1] == ["c1", "c2", "c0"]  # row 1's positive (index 0) is green
    assert t2i.queries[0] == {"id": "0", "text": "a red square",
                              "instruction": "Find me an everyday image that matches the given caption:"}
    assert ref.queries[1]["instruction"] == "Select the portion of the image that follows the language expressions:"
    assert ref.queries[1]["text"] == "the blue one"
    assert list(ref.candidates.values())[0] == {
        "id": "c0", "image": str(data / "eval_images" / "RefCOCO" / "red.png"),
        "instruction": "Represent the given cropped image of the object"}


def test_duplicate_candidates_are_encoded_once_and_galleries_are_per_row(data):
    searches = {r.name: r for r in MMEB(data).retrievals()}
    assert {name: (len(r.queries), len(r.candidates)) for name, r in searches.items()} == {
        "ImageNet-1K": (3, 3), "OK-VQA": (3, 4), "MSCOCO_t2i": (3, 3), "RefCOCO": (2, 2)}  # 9, 6, 9, 4 listed
    assert searches["OK-VQA"].galleries == {"0": ["c0", "c1"], "1": ["c2", "c1"], "2": ["c3", "c1"]}


def test_image_fingerprint_changes_with_an_image(data):
    search = next(r for r in MMEB(data).retrievals() if r.name == "MSCOCO_t2i")
    before = search.candidates.images()
    image(data, "MSCOCO_t2i/green.png", "black")
    os.utime(data / "eval_images" / "MSCOCO_t2i" / "green.png", ns=(1, 1))
    assert search.candidates.images() != before


def test_score_file_against_hand_computed_values():
    out = score_file([1, 2, None, 5], num_data=4)
    assert set(out) == VLM2VEC_KEYS | {"acc", "num_correct"}
    assert out["hit@1"] == out["acc"] == 0.25 and out["num_correct"] == 1
    assert out["hit@5"] == out["recall@5"] == 0.75 and out["precision@5"] == pytest.approx(0.15)
    assert out["mrr@10"] == out["map@10"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 4)
    assert out["mrr@1"] == 0.25
    assert out["ndcg_linear@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert out["ndcg_exponential@5"] == out["ndcg_linear@5"]
    assert out["f1@5"] == pytest.approx(3 * (2 / 6) / 4)
    assert (out["num_pred"], out["num_data"]) == (4, 4)


def test_averages_are_the_leaderboards_means():
    values = {"ImageNet-1K": 80.0, "Place365": 40.0, "OK-VQA": 50.0, "MSCOCO_t2i": 70.0, "RefCOCO": 90.0}
    result = averages(values)
    assert result["Classification"] == (60.0, 2, 10)
    assert result["IND"] == (pytest.approx(200 / 3), 3, 20)
    assert result["OOD"] == (65.0, 2, 16)
    assert result["Overall"] == (66.0, 5, 36)  # mean over subsets, not over the four category means
    assert result["Visual Grounding"] == (90.0, 1, 4)


def test_score_from_hand_made_rankings(data, tmp_path):
    benchmark = MMEB(data, ["ImageNet-1K", "RefCOCO"])
    rankings = {
        "ImageNet-1K": Ranking(ids={"0": ["c1", "c0", "c2"], "1": ["c1", "c0", "c2"], "2": ["c0", "c1", "c2"]},
                               scores={q: [0.9, 0.5, 0.1] for q in "012"}),
        "RefCOCO": Ranking(ids={"0": ["c0", "c1"], "1": ["c1", "c0"]}, scores={q: [0.8, 0.2] for q in "01"}),
    }
    metrics = benchmark.score(rankings)
    assert metrics["ImageNet-1K"] == pytest.approx(100 / 3) and metrics["RefCOCO"] == 100.0
    assert metrics["Overall"] == pytest.approx((100 / 3 + 100) / 2)
    assert metrics["IND"] == pytest.approx(100 / 3) and metrics["OOD"] == 100.0
    assert "VQA" not in metrics
    benchmark.write_report(tmp_path, metrics)
    score = json.loads((tmp_path / "ImageNet-1K_score.json").read_text())
    assert score["hit@1"] == pytest.approx(1 / 3) and score["mrr@10"] == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    predictions = [json.loads(line) for line in (tmp_path / "ImageNet-1K_pred.jsonl").read_text().splitlines()]
    assert predictions[0] == {"row": 0, "prediction": [1, 0, 2], "scores": [0.9, 0.5, 0.1], "label": 0}
    assert predictions[2]["prediction"] == [1, 2, 0]  # row 2 lists c2, c0, c1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["averages"]["Overall"] == {"hit@1": round((100 / 3 + 100) / 2, 2), "subsets": 2, "of": 36}
    assert "reference" not in results and "not the published MMEB" in results["note"]


def test_a_candidate_listed_twice_gives_both_indices():
    assert _prediction(4, ["c0", "c1", "c0"], ["c1", "c0"], [0.9, 0.5]) == {
        "row": 4, "prediction": [1, 0, 2], "scores": [0.9, 0.5, 0.5], "label": 0}


def test_reference_shown_only_on_the_published_data(data, tmp_path, monkeypatch):
    (data / "MMEB-eval" / "README.md").write_text(readme(list(DATASETS)))
    monkeypatch.setattr(mmeb, "PUBLISHED_ROWS", 3)
    benchmark = MMEB(data, ["ImageNet-1K", "MSCOCO_t2i"])
    assert benchmark.is_real_data
    rankings = {name: Ranking(ids={q: ["c0"] for q in "012"}, scores={q: [1.0] for q in "012"})
                for name in ("ImageNet-1K", "MSCOCO_t2i")}
    benchmark.write_report(tmp_path, benchmark.score(rankings))
    reference = json.loads((tmp_path / "results.json").read_text())["reference"]
    assert reference["subsets"] == {"ImageNet-1K": 80.2, "MSCOCO_t2i": 77.5}
    assert reference["averages"]["Overall"] == pytest.approx((80.2 + 77.5) / 2, abs=0.01)
    assert "| ImageNet-1K | Classification | IND | 3 | 33.33 |" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(mmeb, "PUBLISHED_ROWS", 1000)
    assert not MMEB(data, ["ImageNet-1K"]).is_real_data


def test_cli_end_to_end_on_the_tiny_model(data, tmp_path, tiny_model_dir, capsys):
    """`umarvel eval mmeb` as `python -m umarvel` runs it (main), in-process to keep the test fast."""
    out = tmp_path / "out"
    code = main(["eval", "mmeb", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "MMEB hit@1: ImageNet-1K " in printed and "Overall" in printed and "(4 of 36)" in printed
    for name, count in (("ImageNet-1K", 3), ("OK-VQA", 3), ("MSCOCO_t2i", 3), ("RefCOCO", 2)):
        score = json.loads((out / f"{name}_score.json").read_text())
        assert set(score) == VLM2VEC_KEYS | {"acc", "num_correct"} and score["num_data"] == count
        lines = (out / f"{name}_pred.jsonl").read_text().splitlines()
        assert [json.loads(line)["row"] for line in lines] == list(range(count))
        assert (out / f"{name}_run.txt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert list(results["averages"]) == ["Classification", "VQA", "Retrieval", "Visual Grounding", "IND", "OOD",
                                         "Overall"]
    subset_hits = [results["subsets"][name]["hit@1"] for name in SUBSETS]
    assert results["averages"]["Overall"]["hit@1"] == pytest.approx(sum(subset_hits) / 4, abs=0.01)
    assert (out / "results.png").stat().st_size > 0 and (out / "results.md").is_file()


@pytest.mark.slow
def test_two_ranks_shard_the_encoding_and_match_one_process(data, tmp_path, tiny_model_dir):
    """Under torchrun every rank encodes its shards (shard i on rank i mod 2); rank 0's report
    equals a single process's."""
    def run(name, launcher):
        (tmp_path / name).mkdir()
        args = ["eval", "mmeb", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                str(tmp_path / name / "out"), "--cache-dir", str(tmp_path / name / "cache"), "--set", "encode.shard_size=1"]
        result = subprocess.run([*launcher, *args], cwd=tmp_path / name, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-2000:]
        return tmp_path / name / "out"

    one = run("one", [sys.executable, "-m", "umarvel"])
    two = run("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      str(ROOT / "tests" / "eval_rank_recorder.py"), str(tmp_path / "two")])
    assert json.loads((one / "results.json").read_text()) == json.loads((two / "results.json").read_text())
    for name in SUBSETS:
        for suffix in ("_score.json", "_pred.jsonl", "_run.txt"):
            assert (one / f"{name}{suffix}").read_text() == (two / f"{name}{suffix}").read_text()
    ranks = [(tmp_path / "two" / f"rank-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert ranks[0] and ranks[1]  # both ranks encoded shards


# ---- bad inputs: one line, exit 2, naming file / row / column --------------------------------

def _rewrite(data: Path, name: str, **changes) -> Path:
    columns = rows()[name]
    columns.update(changes)
    return write_parquet(parquet(data, name), columns)


def _drop_column(data: Path, name: str, column: str) -> None:
    columns = rows()[name]
    del columns[column]
    write_parquet(parquet(data, name), columns)


BAD_INPUTS = {
    "missing README": (lambda d: (d / "MMEB-eval" / "README.md").unlink(), ["README.md", "not found"]),
    "non-UTF-8 README": (lambda d: (d / "MMEB-eval" / "README.md").write_bytes(b"---\nconfigs:\n  - config_name: \xff\n"),
                         ["README.md:3", "not UTF-8", "column 18"]),
    "README without YAML header": (lambda d: (d / "MMEB-eval" / "README.md").write_text("# MMEB\n"),
                                   ["README.md:1", "no YAML header"]),
    "missing parquet": (lambda d: parquet(d, "OK-VQA").unlink(),
                        ["README.md", "config OK-VQA", "no parquet file matches", "data_files"]),
    "path out of MMEB-eval": (lambda d: (d / "MMEB-eval" / "README.md").write_text(
        readme(["OK-VQA"]).replace("path: OK-VQA/test-*", "path: ../elsewhere/*")), ["config OK-VQA", "leaves MMEB-eval/"]),
    "not a parquet file": (lambda d: parquet(d, "OK-VQA").write_bytes(b"not parquet"),
                           ["OK-VQA/test-00000-of-00001.parquet", "not a readable parquet file"]),
    "no test split": (lambda d: (d / "MMEB-eval" / "README.md").write_text(
        readme(["OK-VQA"]).replace("split: test", "split: train")), ["config OK-VQA: data_files names no 'test' split"]),
    "tgt_text not a list": (lambda d: write_parquet(parquet(d, "OK-VQA"), {**rows()["OK-VQA"], "tgt_text": ["red"] * 3},
                                                    {"tgt_text": pa.string(), "tgt_img_path": pa.list_(pa.string())}),
                            ["row 0: expected a list of strings, got str", "(field 'tgt_text')"]),
    "wrong columns": (lambda d: _drop_column(d, "OK-VQA", "tgt_img_path"),
                      ["OK-VQA/test-00000-of-00001.parquet", "missing column(s) tgt_img_path"]),
    "V2 without tgt_inst": (lambda d: _drop_column(d, "RefCOCO", "tgt_inst"),
                            ["RefCOCO/test-00000-of-00001.parquet", "missing column(s) tgt_inst"]),
    "list lengths differ": (lambda d: _rewrite(d, "OK-VQA", tgt_img_path=[["", ""], [""], ["", ""]]),
                            ["row 1: tgt_text has 2 entries, tgt_img_path 1", "(field 'tgt_img_path')"]),
    "index 0 missing": (lambda d: _rewrite(d, "OK-VQA", tgt_text=[["red", "x"], [], ["blue", "x"]],
                                           tgt_img_path=[["", ""], [], ["", ""]]),
                        ["row 1: no candidates: the positive is index 0", "(field 'tgt_text')"]),
    "empty positive": (lambda d: _rewrite(d, "OK-VQA", tgt_text=[["red", "x"], ["", "x"], ["blue", "x"]]),
                       ["row 1: the positive (index 0) has neither text nor an image"]),
    "null text": (lambda d: _rewrite(d, "OK-VQA", qry_text=["<|image_1|>\nq: a", None, "<|image_1|>\nq: c"]),
                  ["row 1: expected a string, got null", "(field 'qry_text')"]),
    "placeholder without image": (lambda d: _rewrite(d, "OK-VQA", qry_img_path=["OK-VQA/red.png", "", "OK-VQA/blue.png"]),
                                  ["row 1: the text has the image placeholder", "(field 'qry_text')"]),
    "image outside the root": (lambda d: _rewrite(d, "OK-VQA", qry_img_path=["OK-VQA/red.png", "../../secret.png",
                                                                             "OK-VQA/blue.png"]),
                               ["row 1: image path '../../secret.png' resolves outside the data root",
                                "(field 'qry_img_path')"]),
    "missing image": (lambda d: _rewrite(d, "MSCOCO_t2i", tgt_img_path=[["MSCOCO_t2i/red.png", "MSCOCO_t2i/gone.png",
                                                                         "MSCOCO_t2i/blue.png"]] * 3),
                      ["MSCOCO_t2i/test-00000-of-00001.parquet", "row 0: image not found", "gone.png",
                       "(field 'tgt_img_path[1]')"]),
    "empty subset": (lambda d: _rewrite(d, "OK-VQA", **{c: [] for c in rows()["OK-VQA"]}), ["subset OK-VQA has no rows"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, data, tmp_path, tiny_model_dir, capsys):
    damage, expected = BAD_INPUTS[case]
    damage(data)
    files = sorted(p for p in data.rglob("*") if p.is_file())
    code = main(["eval", "mmeb", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("umarvel: error: ") and "\n" not in err and "Traceback" not in err
    for part in expected:
        assert part in err, err
    assert sorted(p for p in data.rglob("*") if p.is_file()) == files  # nothing deleted
    assert not (tmp_path / "o").exists()


def test_symlink_out_of_the_root_needs_the_opt_in(data, tmp_path, tiny_model_dir, capsys):
    outside = tmp_path / "elsewhere.png"
    (data / "eval_images" / "RefCOCO" / "red.png").rename(outside)
    (data / "eval_images" / "RefCOCO" / "red.png").symlink_to(outside)
    argv = ["eval", "mmeb", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "RefCOCO/red.png' is a symlink to" in err and "data.allow_symlinks_outside_root=true" in err
    assert "row 0" in err and "(field 'tgt_img_path[0]')" in err
    assert MMEB(data, ["RefCOCO"], symlinks_outside_root=True).subsets["RefCOCO"].queries


def test_unknown_and_unlisted_subsets(data, tmp_path, tiny_model_dir, capsys):
    base = ["eval", "mmeb", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "o")]
    assert main([*base, "--subset", "CIFAR-100"]) == 2
    assert "unknown MMEB subset CIFAR-100; the subsets are ImageNet-1K" in capsys.readouterr().err
    assert main([*base, "--subset", "OK-VQA", "--subset", "VOC2007"]) == 2
    assert "subset VOC2007 is not among the README's configs" in capsys.readouterr().err
    with pytest.raises(DataError, match="lists none of MMEB's 36 subsets"):
        (data / "MMEB-eval" / "README.md").write_text(readme(["CIFAR-100"]))
        MMEB(data)
