"""Every shipped paper config (configs/umarvel/**.yaml) runs as a GPU user runs it: the DeepSpeed
launcher with 2 ranks and the config's own ZeRO JSON, the tiny Qwen2-VL laid out at the
backbone path the configs name and the synthetic benchmark at their data paths.

Overridden, only what a CPU or a tiny random model cannot do:
  model.attn_implementation=sdpa (no flash-attention on CPU), train.max_steps=2 (run length);
  data.negative_top_up=true for stage 2: an untrained tiny model scores every candidate above
  mine.yaml's 0.9 filter, so no query keeps 5 negatives.
Each training stage must leave DONE, a complete model, and TensorBoard scalars from the
default `report_to: [tensorboard]`.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_telemetry import SCALARS, tensorboard_scalars
from umarvel.data.synthetic import write_synthetic
from umarvel.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--set", "model.attn_implementation=sdpa"]
SHORT = [*CPU, "--set", "train.max_steps=2"]
MINE = ["--model", "runs/umarvel/progressive/mbeir", "--data", "data/M-BEIR"]
# (name, umarvel arguments, run directories it must finish), in dependency order
STEPS = [
    ("progressive", ["train", "--stage", "progressive", "--config", "configs/umarvel/progressive.yaml", *SHORT],
     ["progressive/nli", "progressive/cc3m", "progressive/mbeir"]),
    ("mine", ["mine-negatives", *MINE, "--out", "runs/umarvel/hardneg.jsonl", "--config", "configs/umarvel/mine.yaml",
              *CPU], []),
    ("hardneg", ["train", "--stage", "hardneg", "--config", "configs/umarvel/hardneg.yaml", *SHORT,
                 "--set", "data.negative_top_up=true"], ["hardneg"]),
    ("reranker", ["train", "--stage", "reranker", "--config", "configs/umarvel/reranker.yaml", *SHORT], ["reranker"]),
    ("distill", ["distill", "--config", "configs/umarvel/distill.yaml", *SHORT], ["distill"]),
    ("eval", ["eval", "mbeir", "--pool", "both", "--model", "runs/umarvel/distill", "--data", "data/M-BEIR",
              "--output-dir", "runs/umarvel/eval", "--config", "configs/umarvel/base.yaml", *CPU], []),
    ("table5-mine", ["mine-negatives", *MINE, "--out", "runs/umarvel/hardneg-unfiltered.jsonl",
                     "--config", "configs/umarvel/table5/mine-unfiltered.yaml", *CPU], []),
    ("table5-id0", ["train", "--stage", "hardneg", "--config", "configs/umarvel/table5/id0-topk-only.yaml", *SHORT],
     ["table5/id0-topk-only"]),
    ("table5-id1", ["train", "--stage", "hardneg", "--config", "configs/umarvel/table5/id1-inbatch-topk.yaml", *SHORT],
     ["table5/id1-inbatch-topk"]),
]


def _deepspeed(workdir: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = ["deepspeed", "--num_gpus", "2", "--module", "umarvel", *arguments]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def paper_layout(tmp_path_factory):
    """A working directory with the paths the paper configs name."""
    workdir = tmp_path_factory.mktemp("paper")
    build_tiny_model(workdir / "checkpoints" / "Qwen2-VL-7B-Instruct", seed=0)
    write_synthetic(workdir / "data", seed=0, size="tiny")
    (workdir / "configs").symlink_to(ROOT / "configs")
    return workdir


@pytest.fixture(scope="module")
def paper_runs(paper_layout):
    """Run every step once; a failing step fails every test that needs it, with its log."""
    outcome = {}
    for name, arguments, _ in STEPS:
        done = _deepspeed(paper_layout, arguments)
        outcome[name] = done
        if done.returncode != 0:
            break
    return paper_layout, outcome


def _scalars_of(run_dir: str) -> list[str]:
    """The reranker has no temperature; only InfoNCE stages report in-batch accuracy."""
    skip = {"reranker": ("train/temperature", "train/accuracy"), "distill": ("train/accuracy",)}.get(run_dir, ())
    return [tag for tag in SCALARS if tag not in skip]


@pytest.mark.slow
@pytest.mark.parametrize("name, arguments, run_dirs", STEPS, ids=[step[0] for step in STEPS])
def test_paper_config_runs_under_deepspeed(paper_runs, name, arguments, run_dirs):
    workdir, outcome = paper_runs
    assert name in outcome, "an earlier step failed"
    done = outcome[name]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run_dir in run_dirs:
        run = workdir / "runs" / "umarvel" / run_dir
        assert (run / "DONE").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 2
        model = "model/reranker_config.json" if run_dir == "reranker" else "merged/model.safetensors"
        assert (run / model).is_file()
        scalars = tensorboard_scalars(run)
        for tag in _scalars_of(run_dir):
            assert len(scalars.get(tag, [])) == 2, f"{run_dir}: {tag} not in TensorBoard ({sorted(scalars)})"
        assert "step 2/2 (100%)" in done.stderr + done.stdout


@pytest.mark.slow
def test_stage_two_trains_with_its_top_k_and_table5_top_k_only_uses_own_negatives(paper_runs):
    workdir, _ = paper_runs
    hardneg = json.loads((workdir / "runs/umarvel/hardneg/metrics.json").read_text())["negatives"]
    assert hardneg["selection"] == "top" and hardneg["num_negatives"] == 5
    header = json.loads((workdir / "runs/umarvel/hardneg.jsonl").read_text().splitlines()[0])
    assert header["params"]["top_k"] == 5
    unfiltered = json.loads((workdir / "runs/umarvel/hardneg-unfiltered.jsonl").read_text().splitlines()[0])
    assert unfiltered["params"]["threshold"] == 1.0
    id0 = (workdir / "runs/umarvel/table5/id0-topk-only/config.yaml").read_text()
    assert "in_batch_negatives: false" in id0
