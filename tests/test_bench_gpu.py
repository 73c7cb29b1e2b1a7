"""scripts/bench_gpu.py --tiny: the GPU benchmark's code paths (model load, encode, plain and
GradCache training steps, exact search) on the CPU, with the lines its reader looks for; and the
peak table that its ratios divide by."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_tiny_runs_every_measurement(bench, capsys):
    bench.main(["--tiny", "--attn", "sdpa", "flash_attention_2"])
    out = capsys.readouterr().out
    assert "flash_attention_2: skipped" in out and "attention sdpa, float32:" in out
    encoded = re.findall(r"encode\s+(\d+) visual tokens/image, batch\s+\d+:\s+([\d.]+) items/s", out)
    assert [int(tokens) for tokens, _ in encoded] == [4, 16] and all(float(rate) > 0 for _, rate in encoded)
    steps = re.findall(r"train batch\s+(\d+) .*plain\s+([\d.]+) s .*GradCache\s+([\d.]+) s", out)
    assert [int(batch) for batch, *_ in steps] == [2, 4], out
    assert re.search(r"search 64 queries, top-10 of 10,000 x 64 float32: .* ms, torch matmul \+ top-k", out)
    assert out.count("ratio omitted: no") == 2 + 2 * 2 + 1  # CPU: no peak, said on every figure


def test_peaks_by_device_name_and_flop_ratio(bench):
    assert bench.Peak.of(torch.device("cpu")).tflops is None

    def peak(name):
        return next(((t, b) for part, t, b in bench.PEAKS if part in name), None)

    assert peak("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert peak("NVIDIA H200") == (989.0, 4.8)
    assert peak("NVIDIA H100 PCIe") == (756.0, 2.0)
    assert peak("NVIDIA A100-SXM4-40GB") == (312.0, 1.555)
    assert peak("NVIDIA RTX 9999") is None
    assert bench.Peak("H100", 989.0, 3.35).flops_ratio(989e12 / 2, 1.0) == "50.0% of 989 TFLOPS"
