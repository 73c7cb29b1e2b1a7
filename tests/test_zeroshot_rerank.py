"""U-MARVEL+ on the zero-shot sets (`umarvel eval zeroshot --rerank`): the fused ranking against a
hand computation, a given alpha recorded, alpha `auto` refused before any model loads, and sets
the reranker cannot read refused before any set is evaluated."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_reranker import _adapted_reranker
from zeroshot_fixtures import ccneg, fashioniq_multiturn, flickr, msrvtt

from umarvel.cli import main
from umarvel.evaluation.zeroshot import TASKS
from umarvel.modeling.reranker import Reranker
from umarvel.retrieval.rerank import fuse


@pytest.fixture(scope="module")
def zeroshot_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    for writer in (flickr, ccneg, msrvtt, fashioniq_multiturn):
        writer(root)
    return root


@pytest.fixture(scope="module")
def reranker_dir(tiny_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reranker") / "model"
    _adapted_reranker(tiny_model_dir).save_pretrained(directory)
    return directory


def _eval(root: Path, model, out: Path, tasks: str, *extra: str) -> int:
    return main(["eval", "zeroshot", "--task", tasks, "--model", str(model), "--data", str(root),
                 "--output-dir", str(out), "--cache-dir", str(out.parent / "cache"), *extra])


def _run_file(path: Path) -> dict[str, list[tuple[str, float]]]:
    ranked: dict[str, list[tuple[str, float]]] = {}
    for line in path.read_text().splitlines():
        qid, _, did, _, score, *_ = line.split()
        ranked.setdefault(qid, []).append((did, float(score)))
    return ranked


@pytest.mark.parametrize("task", ["flickr", "ccneg"])  # a search over all candidates; a two-caption gallery
def test_fused_ranking_matches_a_hand_computation(task, zeroshot_root, tiny_model_dir, reranker_dir, tmp_path, capsys):
    alpha, top_k = 0.3, 2
    assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "plain", task) == 0
    assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "plus", task, "--rerank", str(reranker_dir),
                 "--rerank-top-k", str(top_k), "--alpha", str(alpha)) == 0
    assert f"S = a*S_recall + (1-a)*S_rerank with a = {alpha:.2f} (given)" in capsys.readouterr().out

    search = TASKS[task](zeroshot_root).retrievals()[0]
    run_file = f"{task}/{search.run_file_name}"
    recall, fused = _run_file(tmp_path / "plain" / run_file), _run_file(tmp_path / "plus" / run_file)
    qid = search.queries.ids[0]
    query = dict(zip(search.queries.ids, search.queries.items(0, len(search.queries))))[qid]
    candidates = dict(zip(search.candidates.ids, search.candidates.items(0, len(search.candidates))))
    top = recall[qid][:top_k]
    p_yes = Reranker.from_pretrained(reranker_dir).score([(query, candidates[did]) for did, _ in top]).tolist()
    by_hand = [(did, fuse(score, p, alpha)) for (did, score), p in zip(top, p_yes)]
    by_hand += [(did, fuse(score, 0.0, alpha)) for did, score in recall[qid][top_k:]]
    by_hand.sort(key=lambda pair: -pair[1])
    assert [did for did, _ in fused[qid]] == [did for did, _ in by_hand]
    assert [score for _, score in fused[qid]] == pytest.approx([score for _, score in by_hand], abs=2e-6)

    block = json.loads((tmp_path / "plus" / task / "results.json").read_text())["rerank"]
    assert block == {"alpha": alpha, "chosen_on": "given", "top_k": top_k, "model": str(reranker_dir)}
    assert "U-MARVEL+: each query's top 2 re-scored" in (tmp_path / "plus" / task / "results.md").read_text()


def test_alpha_one_keeps_the_recall_ranking(zeroshot_root, tiny_model_dir, reranker_dir, tmp_path):
    assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "plain", "flickr") == 0
    assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "plus", "flickr", "--rerank", str(reranker_dir),
                 "--rerank-top-k", "3", "--alpha", "1") == 0
    for name in ("t2i_run.txt", "i2t_run.txt"):
        plain, plus = _run_file(tmp_path / "plain" / "flickr" / name), _run_file(tmp_path / "plus" / "flickr" / name)
        assert {q: [d for d, _ in r] for q, r in plus.items()} == {q: [d for d, _ in r] for q, r in plain.items()}


def test_alpha_auto_is_refused_before_the_model_loads(zeroshot_root, reranker_dir, tmp_path, capsys):
    missing = tmp_path / "no-model"  # a model load would fail on it first
    for alpha in ([], ["--alpha", "auto"]):
        assert _eval(zeroshot_root, missing, tmp_path / "out", "flickr,ccneg", "--rerank", str(reranker_dir),
                     *alpha) == 2
        err = capsys.readouterr().err
        assert err.startswith("umarvel: error: --alpha auto chooses a on validation queries apart from the scored "
                              "ones, and the zero-shot sets ship only the queries they are scored on")
        assert "--alpha 0.9091" in err
    assert not (tmp_path / "out").exists()
    # without --rerank the fusion weight is not used, and auto is no error
    assert _eval(zeroshot_root, missing, tmp_path / "out", "flickr", "--alpha", "auto") == 2
    assert "--alpha" not in capsys.readouterr().err


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "half"])
def test_alpha_outside_zero_one_is_a_usage_error(alpha, zeroshot_root, reranker_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _eval(zeroshot_root, tmp_path, tmp_path / "out", "flickr", "--rerank", str(reranker_dir), "--alpha", alpha)
    assert exit_info.value.code == 2
    assert f"expected a number in [0, 1] or 'auto', got '{alpha}'" in capsys.readouterr().err


@pytest.mark.parametrize("task, holds", [("msrvtt", "a video"), ("fashioniq_multiturn", "several images")])
def test_sets_the_reranker_cannot_read_are_refused_by_name(task, holds, zeroshot_root, tiny_model_dir, reranker_dir,
                                                           tmp_path, capsys):
    # flickr, which the reranker reads, is listed first: nothing is evaluated before the refusal
    assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "out", f"flickr,{task}", "--rerank", str(reranker_dir),
                 "--alpha", "0.5") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"umarvel: error: {task}: item ")
    assert f"holds {holds}, and the reranker's prompt shows one image per side and no video: leave {task} out of " \
           "--task when reranking" in err
    assert not (tmp_path / "out").exists()


def test_the_embedders_bidirectional_attention_is_not_given_to_the_reranker(zeroshot_root, tiny_model_dir, reranker_dir,
                                                                           tmp_path):
    """configs/umarvel/base.yaml sets the embedder's attention: bidirectional; the reranker, given
    the same model settings, still reads causally (it refuses anything else)."""
    config = tmp_path / "base.yaml"
    config.write_text("model:\n  attention: bidirectional\n  pooling: mean\n")
    for given in (["--config", str(config)], ["--set", "model.attention=bidirectional"]):
        assert _eval(zeroshot_root, tiny_model_dir, tmp_path / "plus", "flickr", "--rerank", str(reranker_dir),
                     "--rerank-top-k", "2", "--alpha", "0.5", *given) == 0
        assert json.loads((tmp_path / "plus" / "flickr" / "results.json").read_text())["rerank"]["alpha"] == 0.5
