"""`umarvel index build` / `umarvel search` and `umarvel.serving.Retriever` on the tiny model and a small corpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import draw_image
from umarvel.cli import main
from umarvel.errors import DataError, UmarvelError
from umarvel.modeling.embedder import load_for_inference
from umarvel.retrieval.encode import model_fingerprint
from umarvel.serving import Retriever
from umarvel.serving.corpus import open_corpus
from umarvel.serving.index_store import IndexManifest, build_index, open_index

TEXTS = ["a red circle", "a blue square", "two cats on a sofa", "a bowl of green apples", "an old stone bridge",
         "a yellow taxi at night", "waves on a beach", "a chess board", "snow on the mountains", "a violin"]


def write_corpus(directory, extra=()):
    """Ten texts, two images (one with a caption), one item with an instruction."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    draw_image("red").save(directory / "images" / "red.png")
    draw_image("blue", "square").save(directory / "images" / "blue.png")
    items = [{"id": f"t{i}", "text": text, "source": "texts"} for i, text in enumerate(TEXTS)]
    items += [{"id": "img-red", "image": "images/red.png"},
              {"id": "img-blue", "image": "images/blue.png", "text": "a square", "instruction": "Describe the image."},
              *extra]
    file = directory / "corpus.jsonl"
    file.write_text("".join(json.dumps(item) + "\n" for item in items))
    return file, items


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return load_for_inference(tiny_model_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A Flat index built through the CLI, with its corpus items."""
    root = tmp_path_factory.mktemp("corpus")
    file, items = write_corpus(root)
    out = root / "index"
    assert main(["index", "build", "--model", str(tiny_model_dir), "--corpus", str(root), "--out", str(out),
                 "--set", "encode.batch_size=4"]) == 0
    return out, items


def brute_force(embedder, items, queries, k):
    """Ranked (id, score) per query from Embedder.encode of the corpus items and the queries."""
    docs = embedder.encode([{key: item[key] for key in ("text", "image", "instruction") if item.get(key)}
                            for item in items], convert_to_numpy=True)
    vectors = embedder.encode(queries, convert_to_numpy=True)
    scores = vectors @ docs.T
    return [[(items[j]["id"], float(row[j])) for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_manifest_and_files(built, tiny_model_dir, embedder):
    out, items = built
    manifest = IndexManifest.read(out)
    assert (manifest.index_type, manifest.count, manifest.size) == ("Flat", len(items), len(items))
    assert manifest.fingerprint == model_fingerprint(embedder)
    assert manifest.model == str(tiny_model_dir.absolute()) and manifest.profile == embedder.settings.profile
    assert (out / "ids.txt").read_text().split() == [item["id"] for item in items]
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert metadata[0] == {"text": TEXTS[0], "source": "texts"}
    assert metadata[-1] == {"image": "images/blue.png", "text": "a square", "instruction": "Describe the image."}


def test_retriever_search_equals_brute_force(built, embedder):
    out, items = built
    root = out.parent
    docs = [item | {"image": str(root / item["image"])} if item.get("image") else item for item in items]
    retriever = Retriever.load(out, model=embedder, use_gpu=False)
    queries = ["a red circle", {"image": draw_image("red"), "text": "this shape", "instruction": "Find it."}]
    got = retriever.search(queries, k=5)
    want = brute_force(embedder, docs, queries, 5)
    for hits, expected in zip(got, want):
        assert [hit.id for hit in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([hit.score for hit in hits], [s for _, s in expected], atol=2e-3)
    single = retriever.search("a red circle", k=3)
    assert [hit.id for hit in single] == [hit.id for hit in got[0][:3]]
    assert single[0].metadata == {"text": "a red circle", "source": "texts"}
    np.testing.assert_allclose(retriever.encode(["a violin"]), embedder.encode(["a violin"], convert_to_numpy=True))
    assert len(retriever.search("a violin", k=100)) == len(items)  # k beyond the index: every item, once


def test_loads_the_manifest_model(built):
    out, _ = built
    retriever = Retriever.load(out, use_gpu=False)  # the model the manifest names
    assert retriever.search("a chess board", k=1)[0].id == "t7"


def test_other_model_fingerprint_is_an_error(built, tmp_path):
    from umarvel.tiny import build_tiny_model

    out, _ = built
    other = build_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(UmarvelError, match="fingerprint .* not comparable"):
        Retriever.load(out, model=other, use_gpu=False)
    assert main(["search", "--index", str(out), "--query", "x", "--model", str(other), "--use-gpu", "no"]) == 2


def test_search_cli(built, capsys):
    out, _ = built
    capsys.readouterr()
    assert main(["search", "--index", str(out), "--query", "a chess board", "-k", "3", "--json", "--use-gpu", "no"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["id"] == "t7" and set(hits[0]) == {"id", "score", "metadata"}
    image = out.parent / "images" / "red.png"
    assert main(["search", "--index", str(out), "--image", str(image), "--instruction", "Find the image.",
                 "-k", "2", "--use-gpu", "no"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"
    assert main(["search", "--index", str(out), "--use-gpu", "no"]) == 2


@pytest.mark.parametrize("factory, params", [("IVF2,Flat", "nprobe=2"), ("HNSW8", "efSearch=32")])
def test_factory_strings(tmp_path, embedder, tiny_model_dir, built, factory, params):
    """IVF (trained on a sample) and HNSW built over the same corpus find what Flat finds here
    (nprobe = every list; HNSW's graph covers 12 items)."""
    flat, _ = built
    from umarvel.config import EncodeConfig

    corpus = open_corpus(flat.parent / "corpus.jsonl")
    manifest = build_index(embedder, corpus, tmp_path / "idx", model=tiny_model_dir, encode_config=EncodeConfig(),
                           index_type=factory, search_params=params, progress=False)
    assert manifest.index_type == factory and manifest.search_params == params
    approximate, exact = (Retriever.load(p, model=embedder, use_gpu=False) for p in (tmp_path / "idx", flat))
    queries = ["a red circle", "snow", "a violin"]
    assert ([[h.id for h in hits] for hits in approximate.search(queries, k=3)]
            == [[h.id for h in hits] for hits in exact.search(queries, k=3)])


def test_bad_factory_string_and_params(tmp_path, built, tiny_model_dir):
    flat, _ = built
    args = ["index", "build", "--model", str(tiny_model_dir), "--corpus", str(flat.parent), "--out", str(tmp_path / "x")]
    assert main(args + ["--index-type", "NotAnIndex"]) == 2
    assert main(args + ["--index-type", "HNSW8", "--search-params", "nprobe=3"]) == 2
    assert not (tmp_path / "x").exists()


def test_confinement_and_item_errors(tmp_path):
    outside = tmp_path / "outside.png"
    draw_image("red").save(outside)
    corpus = tmp_path / "c"
    file, _ = write_corpus(corpus, extra=[{"id": "escape", "image": "../outside.png"}])
    opened = open_corpus(file)
    with pytest.raises(DataError, match=r"corpus.jsonl:13: image path '../outside.png' resolves outside .*'image'"):
        opened.items.items(0, len(opened))
    (corpus / "images" / "link.png").symlink_to(outside)
    file.write_text(json.dumps({"id": "link", "image": "images/link.png"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:1: .*symlink.*'image'"):
        open_corpus(file).items.items(0, 1)
    for record, field in [({"text": "no id"}, "id"), ({"id": "a"}, "text"), ({"id": "a", "text": 3}, "text"),
                          ({"id": 7, "text": "x"}, "id")]:
        file.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=rf"corpus.jsonl:2: .*'{field}'"):
            open_corpus(file)
    file.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}) + "\n")
    with pytest.raises(DataError, match="corpus.jsonl"):
        open_corpus(file)


def test_mbeir_pool_corpus(synthetic_dir, embedder, tiny_model_dir, tmp_path):
    pool = next((synthetic_dir / "M-BEIR" / "cand_pool").rglob("*.jsonl"))
    corpus = open_corpus(pool)
    first = json.loads(pool.read_text().splitlines()[0])
    assert corpus.items.ids[0] == first["did"]
    assert next(corpus.metadata(0, 1)) == {"text": first.get("txt"), "image": first.get("img_path"),
                                           "modality": first["modality"]}
    from umarvel.config import EncodeConfig

    manifest = build_index(embedder, corpus, tmp_path / "pool-index", model=tiny_model_dir,
                           encode_config=EncodeConfig(), progress=False)
    assert manifest.count == len(corpus)


def test_build_resumes_from_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """An interrupted build keeps its finished shards; the next build encodes only the rest and
    no half-written index is left at --out."""
    from umarvel.modeling.embedder import Embedder

    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "cache"))
    file, items = write_corpus(tmp_path / "c")
    args = ["index", "build", "--model", str(tiny_model_dir), "--corpus", str(file), "--out", str(tmp_path / "i"),
            "--set", "encode.shard_size=4", "--set", "encode.batch_size=4"]
    encoded, real_encode = [], Embedder.encode

    def failing_third(self, inputs, *a, **kw):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(len(inputs))
        return real_encode(self, inputs, *a, **kw)

    monkeypatch.setattr(Embedder, "encode", failing_third)
    assert main(args) == 130
    assert not (tmp_path / "i").exists()
    monkeypatch.setattr(Embedder, "encode", lambda self, inputs, *a, **kw: encoded.append(len(inputs))
                        or real_encode(self, inputs, *a, **kw))
    assert main(args) == 0
    assert encoded == [4, 4, 4]  # shards 1-2 before the interruption, shard 3 after
    assert IndexManifest.read(tmp_path / "i").count == len(items)


@pytest.mark.slow
def test_build_under_torchrun_equals_one_process(built, tiny_model_dir, tmp_path):
    """Two ranks (torchrun, gloo) share the encoding and rank 0 writes the index: the same ids and
    vectors as the one-process build."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "launched"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "umarvel",
               "index", "build", "--model", str(tiny_model_dir), "--corpus", str(built[0].parent), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--set", "encode.shard_size=4", "--set", "encode.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    single, launched = open_index(built[0]), open_index(out)
    assert launched.manifest.fingerprint == single.manifest.fingerprint and launched.manifest.count == 12
    assert [launched.ids[i] for i in range(12)] == [single.ids[i] for i in range(12)]
    np.testing.assert_allclose(launched.index.reconstruct_n(0, 12), single.index.reconstruct_n(0, 12), atol=1e-5)
