"""Training monitoring: val recall every train.eval_steps, the best model kept, training.png,
the reranker's accuracy, and the validation keys of the config."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from umarvel.cli import main
from umarvel.config import ConfigError, describe, load_config, to_dict
from umarvel.training import runs, stages
from umarvel.training.validation import Validation, sample_val_pool

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "tiny" / "base.yaml")
MBEIR_STAGE = ["data.source=mbeir", "data.path=data/synthetic/M-BEIR", "train.per_device_batch_size=4",
               "train.eval_queries=16", "train.eval_pool_size=40", "train.report_to=[]"]
# What the patched measurement reports at its three evaluations: the best is the second, a later one is worse.
SCRIPTED = [10.0, 50.0, 20.0]


def _adapter_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_val_recall_every_eval_steps_keeps_the_best_model_and_plots_the_run(tiny_workdir, monkeypatch, caplog):
    measured = []
    real_measure = Validation.measure

    def scripted(self, embedder, prefix="eval"):
        metrics = real_measure(self, embedder, prefix)
        assert embedder.training and torch.is_grad_enabled()  # back in train mode, autograd as before
        measured.append(metrics)
        return {**metrics, f"{prefix}_recall@5": SCRIPTED[len(measured) - 1]}

    monkeypatch.setattr(Validation, "measure", scripted)
    config = load_config(BASE, MBEIR_STAGE + ["train.max_steps=6", "train.eval_steps=2", "train.save_steps=2",
                                              "train.save_total_limit=3", "run.output_dir=runs/monitored"])
    with caplog.at_level(logging.INFO, logger="umarvel"):
        run = stages.train_contrastive(config)

    assert len(measured) == 3 and set(measured[0]) == {"eval_recall@1", "eval_recall@5", "eval_recall@10", "eval_runtime"}
    assert all(0.0 <= value <= 100.0 for metrics in measured for key, value in metrics.items() if "recall" in key)
    history = json.loads((run / "log_history.json").read_text())
    assert {e["step"]: e["eval_recall@5"] for e in history if "eval_recall@5" in e} == dict(zip((2, 4, 6), SCRIPTED))
    steps = [e for e in history if "loss" in e and "step" in e and "train_loss" not in e]
    assert len(steps) == 6 and all({"accuracy", "temperature"} <= set(e) for e in steps)
    lines = [r.getMessage() for r in caplog.records if "| val recall@1" in r.getMessage()]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"] and "recall@5 50.00" in lines[1]

    best = json.loads((run / "best.json").read_text())
    assert best["step"] == 4 and best["value"] == 50.0
    assert json.loads((run / "metrics.json").read_text())["best"]["step"] == 4
    assert _adapter_difference(run / "model", run / "checkpoint-4") == 0.0
    assert _adapter_difference(run / "model", run / "checkpoint-6") > 0.0
    assert (run / "training.png").stat().st_size > 1000


def test_a_resume_that_went_back_past_the_best_drops_it(tmp_path):
    from transformers.trainer_callback import TrainerState

    from umarvel.training.validation import ValPool

    validation = Validation(ValPool([], [], [], {}), load_config(BASE), SimpleNamespace(has_adapter=True), tmp_path)
    (tmp_path / "best").mkdir()
    (tmp_path / "best.json").write_text(json.dumps({"step": 6}))
    state = TrainerState(global_step=4, best_metric=30.0, best_global_step=2)
    validation.on_train_begin(None, state, None)
    assert state.best_metric is None and state.best_global_step is None
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.json").exists()

    (tmp_path / "best.json").write_text(json.dumps({"step": 2}))
    state = TrainerState(global_step=4, best_metric=30.0, best_global_step=2)
    validation.on_train_begin(None, state, None)
    assert state.best_global_step == 2 and (tmp_path / "best.json").is_file()

    with pytest.raises(ConfigError, match=r"^train\.eval_steps: the best model is kept as its LoRA adapter"):
        Validation(ValPool([], [], [], {}), load_config(BASE), SimpleNamespace(has_adapter=False), tmp_path)


def test_the_reranker_logs_its_accuracy(tiny_workdir, tiny_model_dir):
    from umarvel.training.rerank import answer_accuracy, train_reranker

    yes, no = 3, 7
    logits = torch.zeros(3, 10)
    logits[0, yes], logits[1, no], logits[2, yes] = 1.0, 1.0, 1.0
    labels = torch.full((3, 4), -100)
    labels[0, 2], labels[1, 1], labels[2, 3] = yes, yes, no
    assert answer_accuracy(logits, labels, {"YES": yes, "NO": no}) == pytest.approx(1 / 3)

    config = load_config(ROOT / "configs" / "tiny" / "reranker.yaml", [
        f"rerank.recall_model={tiny_model_dir}", "rerank.max_queries=4", "rerank.top_n=4", "train.max_steps=2",
        "train.per_device_batch_size=4", "train.report_to=[]", "encode.cache_dir=cache", "run.output_dir=runs/rr"])
    run = train_reranker(config)
    steps = [e for e in json.loads((run / "log_history.json").read_text()) if "loss" in e and "step" in e]
    assert steps and all(0.0 <= e["accuracy"] <= 1.0 for e in steps)
    assert (run / "training.png").stat().st_size > 1000


def test_no_val_split_is_skipped_for_nli_and_an_error_for_m_beir(tiny_workdir, caplog):
    nli = load_config(BASE, ["data.source=nli", "data.path=data/synthetic/nli_for_simcse.csv", "train.eval_steps=5"])
    with caplog.at_level(logging.INFO, logger="umarvel"):
        assert sample_val_pool(nli) is None
    assert any("no val split" in r.getMessage() for r in caplog.records)
    assert sample_val_pool(load_config(BASE, MBEIR_STAGE)) is None  # eval_steps 0: off

    root = tiny_workdir / "no-val" / "M-BEIR"
    shutil.copytree(tiny_workdir / "data" / "synthetic" / "M-BEIR", root, ignore=shutil.ignore_patterns("val"))
    with pytest.raises(ConfigError, match=r"^train\.eval_steps=5: .* has no val split") as err:
        sample_val_pool(load_config(BASE, MBEIR_STAGE + [f"data.path={root}", "train.eval_steps=5"]))
    assert "\n" not in str(err.value)

    pool = sample_val_pool(load_config(BASE, MBEIR_STAGE + ["train.eval_steps=5", "train.eval_pool_size=1"]))
    positives = set().union(*pool.qrels.values())
    assert len(pool.queries) == 16 and {c["did"] for c in pool.candidates} == positives  # the positives alone


def test_validation_keys_are_documented_validated_overridable_and_shape_runs_only_when_on(capsys):
    keys = {row[0] for row in describe()}
    assert {"train.eval_steps", "train.eval_queries", "train.eval_pool_size", "train.eval_metric"} <= keys
    assert main(["config"]) == 0 and "train.eval_pool_size" in capsys.readouterr().out
    assert load_config(BASE, ["train.eval_steps=50"]).train.eval_steps == 50
    for key, value in [("eval_steps", -1), ("eval_queries", 0), ("eval_pool_size", 0), ("eval_metric", "ndcg")]:
        with pytest.raises(ConfigError, match=rf"train\.{key}: ") as err:
            load_config(BASE, [f"train.{key}={value}"])
        assert "\n" not in str(err.value)

    off, on = to_dict(load_config(BASE)), to_dict(load_config(BASE, ["train.eval_steps=50"]))
    before = {section: dict(values) for section, values in off.items()}
    for key in ("eval_steps", "eval_queries", "eval_pool_size", "eval_metric"):
        del before["train"][key]  # a run recorded before these keys existed
    assert runs.shaping_settings(before) == runs.shaping_settings(off)
    assert runs.config_fingerprint(load_config(BASE)) != runs.config_fingerprint(load_config(BASE, ["train.eval_steps=50"]))
    assert any(line.startswith("train.eval_steps: ") for line in runs.config_differences(off, on))
