"""scripts/bench_train.py's measurement at tiny scale: a plain and a GradCache step each give a
time and a peak-memory figure (the script ran against a removed helper for a wave unnoticed)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def test_bench_train_measures_a_plain_and_a_gradcache_step(tiny_model_dir, capsys):
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for chunk in (0, 2):
        bench.run_one(str(tiny_model_dir), 4, chunk, 1)
        seconds, mib = map(float, capsys.readouterr().out.split())
        assert seconds > 0 and mib >= 0
