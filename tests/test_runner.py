"""The shared runner of the evaluator protocol on a small benchmark defined here: each item set
encoded once, full and per-query-gallery search with ties broken by candidate position, run
files, the report (paper numbers only on real data), and `umarvel eval zeroshot` end to end."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from mini_mbeir import KeywordEmbedder
from umarvel.cli import main
from umarvel import Embedder
from umarvel.config import EncodeConfig
from umarvel.errors import DataError, UmarvelError
from umarvel.evaluation.protocol import Benchmark, ItemSet, Retrieval
from umarvel.evaluation.runner import Runner

KEYWORDS = ["red", "blue", "green", "circle", "square"]
CAPTIONS = {"c0": "red circle", "c1": "blue square", "c2": "red circle", "c3": "green", "c4": "red"}
QUERIES = {"q0": "red circle", "q1": "blue", "q2": "square"}


def item_set(name: str, texts: dict[str, str], source: Path) -> ItemSet:
    items = [{"did": key, "text": text} for key, text in texts.items()]
    return ItemSet(name, list(texts), lambda start, stop: items[start:stop], [source], id_key="did")


class ToyBenchmark(Benchmark):
    """Captions -> captions over all candidates, and the same queries over two-caption galleries
    (listed in reverse order, to show the order a gallery is given in does not matter)."""

    name = "toy"
    paper = {"R@1": 90.0}

    def __init__(self, data_root: Path, settings=None, *, real: bool = False, symlinks_outside_root: bool = False):
        source = data_root / "toy.txt"
        source.write_text(json.dumps([CAPTIONS, QUERIES]))
        self.is_real_data = real
        self.captions = item_set("toy_captions", CAPTIONS, source)
        self.queries = item_set("toy_queries", QUERIES, source)

    def retrievals(self) -> list[Retrieval]:
        galleries = {"q0": ["c2", "c0"], "q1": ["c3", "c1"], "q2": ["c4", "c3"]}
        return [Retrieval("full", self.queries, self.captions, k=3),
                Retrieval("pairs", self.queries, self.captions, k=5, galleries=galleries)]

    def score(self, rankings) -> dict[str, float]:
        positives = {"q0": "c0", "q1": "c1", "q2": "c1"}
        hits = sum(rankings["full"].ids[q][0] == positives[q] for q in QUERIES)
        pairwise = sum(rankings["pairs"].ids[q][0] == positives.get(q) for q in QUERIES)
        return {"R@1": 100.0 * hits / len(QUERIES), "pairwise": 100.0 * pairwise / len(QUERIES)}


@pytest.fixture
def embedder(tmp_path) -> KeywordEmbedder:
    return KeywordEmbedder(KEYWORDS, tmp_path)


def run_lines(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()]


def test_rankings_ties_galleries_and_run_files(embedder, tmp_path):
    runner = Runner(embedder, EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no"), progress=False)
    metrics = runner.run(ToyBenchmark(tmp_path), tmp_path / "out")
    full = run_lines(tmp_path / "out" / "full_run.txt")
    # q0 "red circle": c0 and c2 tie at 1.0 (lower position first), then c4 "red" at 1/sqrt(2)
    assert [(q, did, rank) for q, _, did, rank, *_ in full[:3]] == [("q0", "c0", "1"), ("q0", "c2", "2"), ("q0", "c4", "3")]
    assert [line[2] for line in full if line[0] == "q1"][0] == "c1"
    assert all(len(line) == 6 and line[1] == "Q0" and line[5] == "umarvel" for line in full)  # no task id column
    pairs = run_lines(tmp_path / "out" / "pairs_run.txt")
    # each query ranks only its own gallery; q0's lists c2 first, but c0 (tied, earlier in the set) wins
    assert [(q, did) for q, _, did, *_ in pairs] == [("q0", "c0"), ("q0", "c2"), ("q1", "c1"), ("q1", "c3"),
                                                    ("q2", "c3"), ("q2", "c4")]
    assert [float(line[4]) for line in pairs if line[0] == "q1"] == [pytest.approx(2 ** -0.5, abs=1e-3), 0.0]
    assert metrics == {"R@1": 100.0, "pairwise": pytest.approx(200 / 3)}
    # each item set encoded once although both searches use both
    assert sorted(embedder.encoded) == sorted([*CAPTIONS, *QUERIES])


def test_the_report_shows_paper_numbers_only_on_real_data(embedder, tmp_path):
    runner = Runner(embedder, EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no"), progress=False)
    runner.run(ToyBenchmark(tmp_path), tmp_path / "fixture")
    runner.run(ToyBenchmark(tmp_path, real=True), tmp_path / "real")
    fixture = json.loads((tmp_path / "fixture" / "results.json").read_text())
    real = json.loads((tmp_path / "real" / "results.json").read_text())
    assert fixture["metrics"] == {"R@1": 100.0, "pairwise": 66.67} and "paper" not in fixture
    assert "not the published set" in fixture["note"] and "not the published set" in (tmp_path / "fixture" / "results.md").read_text()
    assert real["paper"] == {"R@1": 90.0} and real["real_data"] is True
    assert "| R@1 | 100.00 | 90.0 | +10.00 |" in (tmp_path / "real" / "results.md").read_text()
    assert (tmp_path / "real" / "results.png").stat().st_size > 0


def test_a_gallery_naming_an_unknown_candidate_is_a_data_error(embedder, tmp_path):
    benchmark = ToyBenchmark(tmp_path)
    search = Retrieval("broken", benchmark.queries, benchmark.captions, k=2,
                       galleries={"q0": ["c0", "c9"], "q1": ["c1"], "q2": ["c1"]})
    benchmark.retrievals = lambda: [search]
    runner = Runner(embedder, EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no"), progress=False)
    with pytest.raises(DataError, match=r"broken: the gallery of query q0 names candidates \['c9'\]"):
        runner.run(benchmark, tmp_path / "out")


def test_a_benchmarks_prompt_overrides_shape_its_vectors_and_are_undone(tiny_model_dir, tmp_path):
    """Flickr and COCO encode with the "in one word" suffix: the runner encodes the benchmark's
    sets with its prompt fields, caches them apart, and leaves the embedder as it was."""
    embedder = Embedder.from_pretrained(tiny_model_dir)
    benchmark = ToyBenchmark(tmp_path)
    benchmark.prompt_overrides = {"compression_prompt": True}
    runner = Runner(embedder, EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no"), progress=False)
    runner.run(benchmark, tmp_path / "out")
    assert embedder.settings.prompt.compression_prompt is False
    with embedder.prompt_overridden(compression_prompt=True):
        suffixed = runner.encode(benchmark.captions).vectors()  # the set the run encoded, not encoded again
    plain = runner.encode(benchmark.captions).vectors()
    items = benchmark.captions.items(0, len(CAPTIONS))
    expected = Embedder.from_pretrained(tiny_model_dir, prompt={"compression_prompt": True}).encode(items)
    assert abs(suffixed.astype("float32") - expected).max() < 2e-3
    assert abs(plain.astype("float32") - embedder.encode(items)).max() < 2e-3
    assert abs(suffixed.astype("float32") - plain.astype("float32")).max() > 1e-2
    benchmark.prompt_overrides = {"compresion_prompt": True}
    with pytest.raises(UmarvelError, match=r"toy: prompt_overrides \['compresion_prompt'\] are not fields"):
        runner.run(benchmark, tmp_path / "typo")


@pytest.fixture
def zeroshot_registry(monkeypatch, embedder):
    """A registry holding the toy benchmark (twice), and the CLI's model loading bypassed."""
    class Other(ToyBenchmark):
        name = "other"

    module = types.ModuleType("umarvel.evaluation.zeroshot")
    module.TASKS = {"toy": ToyBenchmark, "other": Other}
    monkeypatch.setitem(sys.modules, "umarvel.evaluation.zeroshot", module)
    from umarvel.modeling import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "load_for_inference", lambda *args, **kwargs: embedder)
    return module.TASKS


def test_eval_zeroshot_runs_one_task_or_all(zeroshot_registry, tmp_path, capsys):
    common = ["--model", str(tmp_path), "--data", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", "zeroshot", "--task", "toy", *common, "--output-dir", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["toy"]
    assert "toy: R@1 100.00, pairwise 66.67" in capsys.readouterr().out
    assert main(["eval", "zeroshot", "--task", "all", *common, "--output-dir", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["other", "toy"]
    assert json.loads((tmp_path / "all" / "other" / "results.json").read_text())["benchmark"] == "other"


def test_eval_zeroshot_names_the_tasks_on_a_typo_and_needs_data(zeroshot_registry, tmp_path, capsys):
    assert main(["eval", "zeroshot", "--task", "tyo", "--model", str(tmp_path), "--data", str(tmp_path),
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "unknown zero-shot task tyo; the tasks are toy, other (or all)" in capsys.readouterr().err
    assert main(["eval", "zeroshot", "--task", "toy", "--model", str(tmp_path), "--output-dir", str(tmp_path)]) == 2
    assert "needs --data DIR (or eval.zeroshot.data)" in capsys.readouterr().err


def test_eval_zeroshot_runs_every_registered_task_on_its_fixture(tiny_model_dir, tmp_path, capsys):
    """The real registry end to end: each zero-shot task reads its fixture, is encoded, searched and
    reported by the runner; a fixture is not the real set, so no paper number is shown."""
    from zeroshot_fixtures import write_all

    from umarvel.evaluation.zeroshot import TASKS

    root = write_all(tmp_path / "data")
    assert main(["eval", "zeroshot", "--task", "all", "--model", str(tiny_model_dir), "--data", str(root),
                 "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    for name in TASKS:
        results = json.loads((tmp_path / "out" / name / "results.json").read_text())
        assert results["real_data"] is False and "paper" not in results and results["metrics"], name
        assert all(0.0 <= value <= 100.0 for value in results["metrics"].values()), name
        assert list((tmp_path / "out" / name).glob("*_run.txt")), name
        assert f"{name}: " in out
