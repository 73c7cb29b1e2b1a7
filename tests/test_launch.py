"""`umarvel train` under real launchers: torchrun (DDP over gloo) and the DeepSpeed launcher
(ZeRO-2 and ZeRO-3 on CPU), plain and with GradCache; all must train the same adapter, and
under ZeRO-3 save it whole, merge it and resume."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny" / "progressive.yaml")
DEEPSPEED = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29531",
             "--module", "umarvel"]
COMMON = ["train", "--stage", "nli", "--config", CONFIG, "--set", "stages.nli.train.max_steps=3",
          "--set", "train.per_device_batch_size=8", "--set", "model.temperature.learnable=true"]


def _launch(workdir: Path, launcher: list[str], name: str, *extra: str) -> Path:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*launcher, *COMMON, "--set", f"run.output_dir=runs/{name}", *extra]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = workdir / "runs" / name / "nli"
    assert (run / "DONE").is_file()
    return run


def _adapter(run: Path) -> dict:
    """The trained LoRA tensors and the learned temperature."""
    return {**load_file(run / "model" / "adapter_model.safetensors"), **load_file(run / "model" / "temperature.safetensors")}


@pytest.mark.slow
def test_torchrun_and_deepspeed_zero2_train_the_same_adapter(tiny_workdir):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "umarvel"]
    deepspeed = DEEPSPEED
    zero2 = ["--set", f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]
    ddp = _adapter(_launch(tiny_workdir, torchrun, "ddp"))
    ds = _adapter(_launch(tiny_workdir, deepspeed, "zero2", *zero2))
    cached = _adapter(_launch(tiny_workdir, deepspeed, "zero2_gradcache", *zero2, "--set", "train.loss.gradcache_chunk_size=3"))
    assert ddp.keys() == ds.keys() == cached.keys()
    assert max((ddp[k] - ds[k]).abs().max().item() for k in ddp) < 1e-5
    assert max((ds[k] - cached[k]).abs().max().item() for k in ds) < 1e-5
    assert max(ddp[k].abs().max().item() for k in ddp if "lora_B" in k) > 1e-4, "the adapter must have trained"
    assert abs(ddp["tau"].item() - 0.05) > 1e-6, "the learnable temperature must have moved"


@pytest.mark.slow
def test_deepspeed_zero3_saves_the_whole_adapter_merges_resumes_and_caches_gradients(tiny_workdir):
    """configs/deepspeed/zero3.json, 2 updates, a checkpoint after each."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from umarvel.modeling.embedder import Embedder

    zero3 = ["--set", f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}",
             "--set", "stages.nli.train.max_steps=2", "--set", "train.save_steps=1"]
    run = _launch(tiny_workdir, DEEPSPEED, "zero3", *zero3)
    adapter = _adapter(run)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2

    # Whole: equal to DeepSpeed's own fp32 reconstruction from the partitions in its checkpoint.
    partitions = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoint-2"))
    expected = {k.removeprefix("backbone.").replace(".default.", "."): v for k, v in partitions.items() if "lora_" in k}
    expected["tau"] = partitions["temperature.tau"]
    assert adapter.keys() == expected.keys()
    assert max((adapter[k] - expected[k]).abs().max().item() for k in adapter) < 1e-7
    assert max(adapter[k].abs().max().item() for k in adapter if "lora_B" in k) > 1e-4, "the adapter must have trained"

    items = [{"text": "a red circle"}, {"text": "two dogs in the snow", "instruction": "Find a caption."}, {"text": "x"}]
    unmerged = Embedder.from_pretrained(run / "model").encode(items)
    merged = Embedder.from_pretrained(run / "merged").encode(items)
    assert abs(unmerged - merged).max() < 1e-5

    # Resume from checkpoint-1: only the second update runs, and lands where the uninterrupted run's did.
    for name in ("checkpoint-2", "model", "merged"):
        shutil.rmtree(run / name)
    for name in ("DONE", "metrics.json", "log_history.json"):
        (run / name).unlink()
    first_update = (run / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns
    resumed = _adapter(_launch(tiny_workdir, DEEPSPEED, "zero3", *zero3, "--resume"))
    assert (run / "checkpoint-1" / "trainer_state.json").stat().st_mtime_ns == first_update, "update 1 ran again"
    assert max((adapter[k] - resumed[k]).abs().max().item() for k in adapter) < 1e-6

    cached = _adapter(_launch(tiny_workdir, DEEPSPEED, "zero3_gradcache", *zero3,
                              "--set", "train.loss.gradcache_chunk_size=3"))
    assert max((adapter[k] - cached[k]).abs().max().item() for k in adapter) < 1e-5


@pytest.mark.slow
def test_zero3_step_with_images_on_one_rank_only(family_model_dir, tmp_path):
    """ZeRO-3 gathers the frozen vision tower collectively: the image-less rank must run it too
    (on every family: the dummy image is the family record's)."""
    out = tmp_path / "embeddings"
    command = [*DEEPSPEED[:-2], str(ROOT / "tests" / "deepspeed_zero3_vision_worker.py"),
               "--model", str(family_model_dir), "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}.pt", weights_only=True)
        assert (result["partitioned"] - result["whole"]).abs().max().item() < 1e-5
