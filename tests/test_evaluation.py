"""M-BEIR evaluators: local vs global semantics on a hand-made benchmark, run files, the
embedding cache (re-use, invalidation, resume), the CLI end to end, and 2-process encoding."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mini_mbeir import KeywordEmbedder, query, text_candidate, write_jsonl, write_mini_mbeir
from umarvel import Embedder
from umarvel.cli import main
from umarvel.config import EncodeConfig, MBEIREvalConfig
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, QUERY_INSTRUCTIONS
from umarvel.evaluation.mbeir import POOLS, MBEIREvaluator, selected_rows
from umarvel.evaluation.report import RESULTS_CSV, RESULTS_JSON, RESULTS_MD, RESULTS_PNG, run_file_name
from umarvel.retrieval.encode import load_encoded

ROOT = Path(__file__).resolve().parents[1]
KEYWORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
OVEN, INFOSEEK = "oven_task6", "infoseek_task6"
OVEN_POOL = [text_candidate("5:1", "alpha"), text_candidate("5:2", "beta"), text_candidate("5:3", "gamma")]
INFOSEEK_POOL = [text_candidate("6:1", "beta zeta")] + [
    text_candidate(f"6:{i}", word) for i, word in enumerate(["delta", "epsilon", "eta", "theta"], start=2)
]
QUERIES = {
    OVEN: [query(OVEN, "5:10", "gamma", ["5:3"])],
    INFOSEEK: [
        query(INFOSEEK, "6:10", "alpha", ["5:1"]),  # its only positive lives in OVEN's pool
        query(INFOSEEK, "6:11", "beta", ["6:1"]),  # OVEN's exact "beta" (5:2) outranks it globally
    ],
}
INFOSEEK_IDS = ["6:10", "6:11"] + [c["did"] for c in INFOSEEK_POOL]


@pytest.fixture(autouse=True)
def table_cache(tmp_path, monkeypatch):
    """Parsed-table caches go under the test's directory, not ~/.cache."""
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))


@pytest.fixture
def mini(tmp_path) -> Path:
    return write_mini_mbeir(tmp_path / "M-BEIR", QUERIES, {OVEN: OVEN_POOL, INFOSEEK: INFOSEEK_POOL})


@pytest.fixture
def keyword_embedder(tmp_path) -> KeywordEmbedder:
    return KeywordEmbedder(KEYWORDS, tmp_path)


@pytest.fixture
def encoded_ids(monkeypatch) -> list[str]:
    """Ids of the items Embedder.encode is asked to embed, in call order."""
    log: list[str] = []
    original = Embedder.encode

    def recording(self, items, *args, **kwargs):
        log.extend(item.get("qid") or item["did"] for item in items)
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", recording)
    return log


def evaluator(embedder, root: Path, cache: Path, rows=(OVEN, INFOSEEK), **encode) -> MBEIREvaluator:
    return MBEIREvaluator(embedder, root, EncodeConfig(cache_dir=str(cache), **encode), MBEIREvalConfig(rows=list(rows)),
                          progress=False)


def evaluate(embedder, root: Path, cache: Path, out: Path, pools=POOLS, rows=(OVEN, INFOSEEK), **settings):
    """{pool: {row name: RowResult}}."""
    results = evaluator(embedder, root, cache, rows, **settings).evaluate(selected_rows(list(rows)), pools, out)
    return {pool: {r.row.name: r for r in row_results} for pool, row_results in results.items()}


def run_lines(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()]


def ranked(path: Path) -> dict[str, list[str]]:
    """qid -> retrieved dids, best first, from a run file."""
    out: dict[str, list[str]] = {}
    for qid, _, did, *_ in run_lines(path):
        out.setdefault(qid, []).append(did)
    return out


def pool_dids(root: Path, row) -> list[str]:
    return [json.loads(line)["did"] for line in (root / row.local_pool_file()).read_text().splitlines()]


# ---- local vs global -------------------------------------------------------------------------

def test_cross_dataset_positive_is_a_hit_only_in_the_global_pool(mini, keyword_embedder, tmp_path):
    out = tmp_path / "out"
    results = evaluate(keyword_embedder, mini, tmp_path / "cache", out)

    assert results["local"][INFOSEEK].recall == {1: 50.0, 5: 50.0, 10: 50.0}
    assert results["global"][INFOSEEK].recall == {1: 50.0, 5: 100.0, 10: 100.0}
    assert results["local"][OVEN].recall == results["global"][OVEN].recall == {1: 100.0, 5: 100.0, 10: 100.0}

    local = ranked(out / "local" / run_file_name(EVAL_ROWS_BY_NAME[INFOSEEK], "local"))
    # "alpha" matches nothing in InfoSeek's own pool: all tie at 0, in pool order; 5:1 is not searched.
    assert local["6:10"] == ["6:1", "6:2", "6:3", "6:4", "6:5"]
    assert local["6:11"][0] == "6:1"

    union = [did for row in EVAL_ROWS for did in pool_dids(mini, row)]
    global_ = ranked(out / "global" / run_file_name(EVAL_ROWS_BY_NAME[INFOSEEK], "global"))
    assert global_["6:10"] == ["5:1"] + [did for did in union if did != "5:1"]
    assert global_["6:11"][:2] == ["5:2", "6:1"]

    written = json.loads((out / "global" / RESULTS_JSON).read_text())
    assert written["pool"] == "global"
    assert written["rows"][INFOSEEK]["recall"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0}
    assert json.loads((out / "local" / RESULTS_JSON).read_text())["rows"][INFOSEEK]["headline"] == 50.0


def test_one_pool_is_written_into_its_pool_folder_and_re_uses_the_encodings(mini, keyword_embedder, tmp_path):
    cache = tmp_path / "cache"
    both = evaluate(keyword_embedder, mini, cache, tmp_path / "both")
    encoded = len(keyword_embedder.encoded)
    for pool in POOLS:
        alone = evaluate(keyword_embedder, mini, cache, tmp_path / pool, pools=(pool,))
        assert alone[pool] == both[pool]
        assert not (tmp_path / pool / RESULTS_JSON).exists()
        assert (tmp_path / pool / pool / RESULTS_JSON).read_text() == (tmp_path / "both" / pool / RESULTS_JSON).read_text()
    assert len(keyword_embedder.encoded) == encoded


# ---- embedding cache -----------------------------------------------------------------------

def shard_stamps(cache: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in cache.rglob("shard-*")}


def test_second_evaluation_of_the_same_model_encodes_nothing(tiny_model_dir, mini, tmp_path, encoded_ids):
    cache = tmp_path / "cache"
    first = evaluate(Embedder.from_pretrained(tiny_model_dir), mini, cache, tmp_path / "a", rows=[INFOSEEK])
    union = [did for row in EVAL_ROWS for did in pool_dids(mini, row)]
    assert sorted(encoded_ids) == sorted(["6:10", "6:11", *union])
    stamps = shard_stamps(cache)
    encoded_ids.clear()

    second = evaluate(Embedder.from_pretrained(tiny_model_dir), mini, cache, tmp_path / "b", rows=[INFOSEEK])
    assert encoded_ids == []
    assert second == first
    assert shard_stamps(cache) == stamps
    for pool in POOLS:
        name = run_file_name(EVAL_ROWS_BY_NAME[INFOSEEK], pool)
        assert (tmp_path / "b" / pool / name).read_bytes() == (tmp_path / "a" / pool / name).read_bytes()


@pytest.mark.parametrize(
    ("overrides", "re_encoded"),
    [
        ({"pooling": "last"}, INFOSEEK_IDS),
        ({"mask_instruction": False}, INFOSEEK_IDS),
        ({"prompt": {"use_instruction": False}}, INFOSEEK_IDS),
        ({"attention": "causal"}, INFOSEEK_IDS),
        ({"temperature": {"init": 0.07}}, []),  # cannot change an embedding: cache re-used
    ],
    ids=["pooling", "mask_instruction", "use_instruction", "attention", "temperature"],
)
def test_model_settings_that_shape_embeddings_re_encode(
    tiny_model_dir, mini, tmp_path, encoded_ids, overrides, re_encoded
):
    cache = tmp_path / "cache"
    evaluate(Embedder.from_pretrained(tiny_model_dir), mini, cache, tmp_path / "a", pools=("local",), rows=[INFOSEEK])
    encoded_ids.clear()
    evaluate(Embedder.from_pretrained(tiny_model_dir, **overrides), mini, cache, tmp_path / "b", pools=("local",),
             rows=[INFOSEEK])
    assert sorted(encoded_ids) == sorted(re_encoded)


def pool_vectors(embedder, root: Path, cache: Path) -> np.ndarray:
    return evaluator(embedder, root, cache, rows=[INFOSEEK]).local_pool(EVAL_ROWS_BY_NAME[INFOSEEK]).vectors()


def test_changed_weights_re_encode(tiny_model_dir, mini, tmp_path, encoded_ids):
    cache = tmp_path / "cache"
    adapted = Embedder.from_pretrained(tiny_model_dir, trainable=True)
    before = pool_vectors(adapted, mini, cache)
    assert len(encoded_ids) == len(INFOSEEK_POOL)
    with torch.no_grad():
        next(p for name, p in adapted.named_parameters() if "lora_B" in name).add_(0.05)
    after = pool_vectors(adapted, mini, cache)
    assert len(encoded_ids) == 2 * len(INFOSEEK_POOL)
    assert not np.array_equal(before, after)

    # The backbone counts by content, not path: an identical copy re-uses, a changed file does not.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    plain = pool_vectors(Embedder.from_pretrained(tiny_model_dir), mini, cache)
    encoded_ids.clear()
    assert np.array_equal(pool_vectors(Embedder.from_pretrained(copy), mini, cache), plain)
    assert encoded_ids == []
    weights = load_file(copy / "model.safetensors")
    name = next(n for n in weights if "layers.0" in n and n.endswith("q_proj.weight"))
    weights[name] += 0.05
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    changed = pool_vectors(Embedder.from_pretrained(copy), mini, cache)
    assert len(encoded_ids) == len(INFOSEEK_POOL)
    assert not np.array_equal(changed, plain)


def test_changed_data_files_re_encode_only_their_sets(mini, keyword_embedder, tmp_path):
    cache, row = tmp_path / "cache", EVAL_ROWS_BY_NAME[INFOSEEK]
    log = keyword_embedder.encoded

    def encoded_by_next_run() -> list[str]:
        log.clear()
        evaluate(keyword_embedder, mini, cache, tmp_path / "out", pools=("local",), rows=[INFOSEEK])
        return log

    assert sorted(encoded_by_next_run()) == sorted(INFOSEEK_IDS)
    write_jsonl(mini / row.local_pool_file(), INFOSEEK_POOL[:-1] + [text_candidate("6:5", "theta eta")])
    assert encoded_by_next_run() == [c["did"] for c in INFOSEEK_POOL]
    write_jsonl(mini / row.query_file("test"), [query(INFOSEEK, "6:10", "alpha beta", ["5:1"]), QUERIES[INFOSEEK][1]])
    assert encoded_by_next_run() == ["6:10", "6:11"]
    instructions = mini / QUERY_INSTRUCTIONS
    instructions.write_text(instructions.read_text().replace("Find what this asks for.", "Find the entity."))
    assert encoded_by_next_run() == ["6:10", "6:11"]
    qrels = mini / row.qrels_file("test")
    qrels.write_text(qrels.read_text() + "6:10 0 6:2 1 6\n")  # relevance does not shape an embedding
    assert encoded_by_next_run() == []


class Interrupted(Exception):
    pass


def recording_encode(calls: list[list[str]], crash_on_call: int | None = None):
    """Embedder.encode that appends each call's dids to `calls` and raises on call `crash_on_call`."""
    original = Embedder.encode

    def encode(self, items, *args, **kwargs):
        calls.append([item["did"] for item in items])
        if len(calls) == crash_on_call:
            raise Interrupted
        return original(self, items, *args, **kwargs)

    return encode


def interrupt_after_first_shard(embedder, root: Path, cache: Path, monkeypatch) -> Path:
    """Encode InfoSeek's pool in shards of 2 until the second shard raises; the set's directory."""
    monkeypatch.setattr(Embedder, "encode", recording_encode([], crash_on_call=2))
    with pytest.raises(Interrupted):
        evaluator(embedder, root, cache, rows=[INFOSEEK], shard_size=2).local_pool(EVAL_ROWS_BY_NAME[INFOSEEK])
    (set_dir,) = [p.parent for p in cache.rglob("shard-00000.npy")]
    return set_dir


def test_interrupted_encoding_resumes_from_its_finished_shards(tiny_model_dir, mini, tmp_path, monkeypatch):
    row = EVAL_ROWS_BY_NAME[INFOSEEK]
    embedder = Embedder.from_pretrained(tiny_model_dir)
    straight = evaluator(embedder, mini, tmp_path / "straight", rows=[INFOSEEK], shard_size=2).local_pool(row)
    set_dir = interrupt_after_first_shard(embedder, mini, tmp_path / "resumed", monkeypatch)
    assert sorted(p.name for p in set_dir.iterdir()) == ["shard-00000.checksum", "shard-00000.ids.txt", "shard-00000.npy"]
    assert load_encoded(set_dir) is None  # no manifest: never read as complete
    first_shard = set_dir / "shard-00000.npy"
    stamp = first_shard.read_bytes(), first_shard.stat().st_mtime_ns

    calls: list[list[str]] = []
    monkeypatch.setattr(Embedder, "encode", recording_encode(calls))
    resumed = evaluator(embedder, mini, tmp_path / "resumed", rows=[INFOSEEK], shard_size=2).local_pool(row)
    assert calls == [["6:3", "6:4"], ["6:5"]]
    assert (first_shard.read_bytes(), first_shard.stat().st_mtime_ns) == stamp
    assert resumed.ids == straight.ids == [c["did"] for c in INFOSEEK_POOL]
    assert resumed.vectors().dtype == np.float16
    np.testing.assert_array_equal(resumed.vectors(), straight.vectors())


def test_resuming_with_another_shard_size_re_encodes_the_mismatched_shards(tiny_model_dir, mini, tmp_path, monkeypatch):
    row = EVAL_ROWS_BY_NAME[INFOSEEK]
    embedder = Embedder.from_pretrained(tiny_model_dir)
    straight = evaluator(embedder, mini, tmp_path / "straight", rows=[INFOSEEK], shard_size=3).local_pool(row)
    interrupt_after_first_shard(embedder, mini, tmp_path / "resumed", monkeypatch)

    calls: list[list[str]] = []
    monkeypatch.setattr(Embedder, "encode", recording_encode(calls))
    resumed = evaluator(embedder, mini, tmp_path / "resumed", rows=[INFOSEEK], shard_size=3).local_pool(row)
    assert calls == [["6:1", "6:2", "6:3"], ["6:4", "6:5"]]  # the old 2-row shard 0 is not shard 0 of 3
    assert resumed.ids == straight.ids == [c["did"] for c in INFOSEEK_POOL]
    np.testing.assert_array_equal(resumed.vectors(), straight.vectors())


# ---- the CLI end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_eval(tmp_path_factory, tiny_model_dir, synthetic_dir):
    """`umarvel eval mbeir --pool both` of the tiny model on the tiny synthetic benchmark."""
    work = tmp_path_factory.mktemp("cli_eval")
    out, cache = work / "out", work / "cache"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("UMARVEL_CACHE", str(work / "umarvel-cache"))
        code = main(["eval", "mbeir", "--pool", "both", "--model", str(tiny_model_dir), "--data",
                     str(synthetic_dir / "M-BEIR"), "--output-dir", str(out), "--set", f"encode.cache_dir={cache}"])
    assert code == 0
    return out, cache, stdout.getvalue()


def query_count(root: Path, row) -> int:
    return len((root / row.query_file("test")).read_text().splitlines())


def test_cli_eval_of_both_pools_writes_results_and_run_files_per_pool(cli_eval, synthetic_dir):
    out, _, stdout = cli_eval
    for pool in POOLS:
        results = json.loads((out / pool / RESULTS_JSON).read_text())
        assert results["pool"] == pool
        assert list(results["rows"]) == [row.name for row in EVAL_ROWS]
        for row in EVAL_ROWS:
            entry = results["rows"][row.name]
            assert entry["metric"] == row.headline
            assert list(entry["recall"]) == [f"R@{k}" for k in row.recall_ks]
            assert entry["headline"] == entry["recall"][row.headline]
            assert all(0.0 <= value <= 100.0 for value in entry["recall"].values())
            assert entry["queries"] == query_count(synthetic_dir / "M-BEIR", row)
        headlines = [entry["headline"] for entry in results["rows"].values()]
        assert results["average"] == pytest.approx(sum(headlines) / len(headlines), abs=0.005)
        assert "note" not in results  # all 16 rows: comparable to the paper's average
        assert f"{pool}: average {results['average']:.2f} over 16 rows" in stdout
        run_files = sorted(p.name for p in (out / pool).glob("*_run.txt"))
        assert run_files == sorted(run_file_name(row, pool) for row in EVAL_ROWS)
        assert "| **Avg.** |" in (out / pool / RESULTS_MD).read_text()
        assert "The paper's numbers are not shown" in (out / pool / RESULTS_MD).read_text()  # synthetic pools
        assert len((out / pool / RESULTS_CSV).read_text().splitlines()) == 1 + 16 + 1
        assert (out / pool / RESULTS_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cached_vectors(cache: Path, prefix: str):
    (directory,) = [p for p in cache.glob(f"*/{prefix}-*") if p.is_dir()]
    encoded = load_encoded(directory)
    return encoded.vectors().astype(np.float32), encoded.ids


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_run_files_hold_the_exact_top_k_in_the_reference_format(cli_eval, synthetic_dir):
    out, cache, _ = cli_eval
    pools = {row.name: cached_vectors(cache, f"{row.name}_pool") for row in EVAL_ROWS}
    union = (np.concatenate([v for v, _ in pools.values()]), [did for _, ids in pools.values() for did in ids])
    top_k = MBEIREvalConfig().top_k
    for pool in POOLS:
        for row in EVAL_ROWS:
            queries, qids = cached_vectors(cache, f"{row.name}_test_queries")
            candidates, dids = pools[row.name] if pool == "local" else union
            lines = run_lines(out / pool / run_file_name(row, pool))
            k = min(top_k, len(dids))
            assert len(lines) == len(qids) * k
            assert all(len(line) == 7 and line[1] == "Q0" and line[5] == "umarvel" for line in lines)
            assert {line[6] for line in lines} == {str(row.task_id)}
            brute = unit(queries) @ unit(candidates).T  # cosine: the search re-normalises the fp16 vectors
            position = {did: i for i, did in enumerate(dids)}
            for q, qid in enumerate(qids):
                mine = lines[q * k : (q + 1) * k]
                assert [line[0] for line in mine] == [qid] * k
                assert [int(line[3]) for line in mine] == list(range(1, k + 1))
                scores = [float(line[4]) for line in mine]
                assert scores == sorted(scores, reverse=True)
                # Each listed score is that candidate's, and together they are the k best.
                listed = [brute[q, position[line[2]]] for line in mine]
                np.testing.assert_allclose(scores, listed, atol=2e-6)
                np.testing.assert_allclose(scores, np.sort(brute[q])[::-1][:k], atol=2e-6)
                assert len({line[2] for line in mine}) == k


# ---- two processes -------------------------------------------------------------------------

def run_eval(argv: list[str], work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMARVEL_CACHE": str(work / "umarvel-cache")}
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
def test_two_process_encoding_splits_the_shards_and_matches_one_process(tiny_model_dir, synthetic_dir, tmp_path):
    def eval_args(name: str) -> list[str]:
        return ["eval", "mbeir", "--pool", "both", "--model", str(tiny_model_dir),
                "--data", str(synthetic_dir / "M-BEIR"), "--output-dir", str(tmp_path / name / "out"),
                "--set", f"encode.cache_dir={tmp_path / name / 'cache'}", "--set", "encode.shard_size=4"]

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    run_eval([sys.executable, "-m", "umarvel", *eval_args("one")], tmp_path / "one")
    recorder = str(ROOT / "tests" / "eval_rank_recorder.py")
    run_eval([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              recorder, str(tmp_path / "two"), *eval_args("two")], tmp_path / "two")

    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    for pool in POOLS:
        results = [json.loads((out / pool / RESULTS_JSON).read_text()) for out in (one, two)]
        assert results[0] == results[1]
        for row in EVAL_ROWS:
            name = run_file_name(row, pool)
            assert (two / pool / name).read_text() == (one / pool / name).read_text(), name

    # Every shard was encoded exactly once, by rank (shard index mod 2).
    expected = Counter()
    for ids_file in (tmp_path / "two" / "cache").rglob("shard-*.ids.txt"):
        expected[(tuple(ids_file.read_text().split()), int(ids_file.name[6:11]) % 2)] += 1
    recorded = Counter()
    for rank in (0, 1):
        record = tmp_path / "two" / f"rank-{rank}.txt"  # absent when the rank encoded nothing
        for line in record.read_text().splitlines() if record.exists() else []:
            recorded[(tuple(line.split()), rank)] += 1
    assert recorded == expected
    assert {rank for _, rank in recorded} == {0, 1}
    for one_set in (tmp_path / "one" / "cache").glob("*/*"):
        two_set = load_encoded(tmp_path / "two" / "cache" / one_set.parent.name / one_set.name)
        np.testing.assert_array_equal(two_set.vectors(), load_encoded(one_set).vectors())


def test_validate_eval_and_mining_take_the_same_data_directory(tiny_model_dir, synthetic_dir, tmp_path, capsys):
    """One rule for --data: the M-BEIR root, or the data directory holding M-BEIR/ (as synth writes it)."""
    parent = str(synthetic_dir)
    assert main(["data", "validate", "--data", parent, "--images", "skip"]) == 0
    cache = ["--set", f"encode.cache_dir={tmp_path / 'cache'}"]
    assert main(["eval", "mbeir", "--model", str(tiny_model_dir), "--data", parent, "--output-dir", str(tmp_path / "eval"),
                 "--set", "eval.mbeir.rows=[mscoco_task0]", *cache]) == 0
    assert "local: average" in capsys.readouterr().out
    assert main(["mine-negatives", "--model", str(tiny_model_dir), "--data", parent, "--out", str(tmp_path / "neg.jsonl"),
                 *cache]) == 0
    assert (tmp_path / "neg.jsonl").is_file()


def test_cache_dir_flag_places_the_embeddings_and_the_log_says_where(tiny_model_dir, synthetic_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="umarvel"):
        assert main(["eval", "mbeir", "--model", str(tiny_model_dir), "--data", str(synthetic_dir), "--output-dir",
                     str(tmp_path / "eval"), "--set", "eval.mbeir.rows=[nights_task4]", "--cache-dir", str(tmp_path / "vectors")]) == 0
    (model_dir,) = (tmp_path / "vectors").iterdir()
    assert sorted(p.name.split("-")[0] for p in model_dir.iterdir()) == ["nights_task4_pool", "nights_task4_test_queries"]
    assert f"embedding cache: {model_dir} (re-used by later runs of this model; safe to delete)" in caplog.text
    assert not (tmp_path / "umarvel-cache" / "embeddings").exists()  # nothing in the default place
