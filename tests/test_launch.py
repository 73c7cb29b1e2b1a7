"""`umarvel train` under real launchers: torchrun (DDP over gloo) and the DeepSpeed launcher
(ZeRO-2 on CPU), plain and with GradCache; all three must train the same adapter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny" / "progressive.yaml")
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
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                 "--master_port", "29531", "--module", "umarvel"]
    zero2 = ["--set", f"train.deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}"]
    ddp = _adapter(_launch(tiny_workdir, torchrun, "ddp"))
    ds = _adapter(_launch(tiny_workdir, deepspeed, "zero2", *zero2))
    cached = _adapter(_launch(tiny_workdir, deepspeed, "zero2_gradcache", *zero2, "--set", "train.loss.gradcache_chunk_size=3"))
    assert ddp.keys() == ds.keys() == cached.keys()
    assert max((ddp[k] - ds[k]).abs().max().item() for k in ddp) < 1e-5
    assert max((ds[k] - cached[k]).abs().max().item() for k in ds) < 1e-5
    assert max(ddp[k].abs().max().item() for k in ddp if "lora_B" in k) > 1e-4, "the adapter must have trained"
    assert abs(ddp["tau"].item() - 0.05) > 1e-6, "the learnable temperature must have moved"
