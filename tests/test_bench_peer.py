"""scripts/bench_peer.py at tiny scale: both sides train one step, the table and ratios are printed,
and the two sides agree on the loss and the gradients (else the comparison would be meaningless)."""
import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_peer.py"


def test_bench_peer_tiny_prints_both_sides_ratios_and_the_same_step(capsys):
    spec = importlib.util.spec_from_file_location("bench_peer", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny"])
    out = capsys.readouterr().out
    number = r"\s+([\d.]+)"
    rows = {name: re.search(rf"^{name}{number}{number}{number}{number}$", out, re.M) for name in bench.SIDES}
    assert all(rows.values()), out
    for row in rows.values():
        samples_per_s, seconds = float(row.group(1)), float(row.group(2))
        assert samples_per_s > 0 and abs(samples_per_s * seconds - 4) < 0.05
    assert re.search(r"ours / sentence-transformers: speed [\d.]+x, peak memory ", out), out
    same = re.search(r"loss difference ([\d.e+-]+), largest gradient difference ([\d.e+-]+)", out)
    assert float(same.group(1)) < 1e-5 and float(same.group(2)) < 1e-5, out
