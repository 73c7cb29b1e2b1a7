"""Mutation testing of one core module with mutmut (`pip install -e ".[mutation]"`).

    nice python scripts/mutation.py umarvel/training/losses.py            # the module's fast tests
    nice python scripts/mutation.py umarvel/retrieval/mining.py --minutes 15
    nice python scripts/mutation.py umarvel/evaluation/metrics.py tests/test_metrics.py

mutmut changes one operator, constant or call of the module at a time and runs the tests
that cover the changed function; a mutant that no test notices ("survived") is a behaviour
the suite does not pin down. Run it on a module when its code changes, read the survivors,
and add a test for each one that matters (some are equivalent: `x >= 1` vs `x > 0` on ints).

The repository is never touched: umarvel/, tests/ and pyproject.toml are copied into a scratch
directory (default /tmp/umarvel-mutation/<module>), mutmut is configured there for the one
module and its fast tests (-m "not slow"), and the run is capped at --minutes (its process
group is killed then; the mutants tested so far are still reported). Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The fast tests that pin each core module down (extend when adding a module or a test file).
CORE = {
    "umarvel/training/losses.py": ["tests/test_losses.py", "tests/test_unknown_ids.py", "tests/test_loss_details.py",
                                   "tests/test_rank_emulation.py", "tests/test_distributed.py", "tests/test_gradcache.py"],
    "umarvel/training/distributed.py": ["tests/test_rank_emulation.py", "tests/test_distributed.py",
                                        "tests/test_losses.py"],
    # test_mining.py's other tests encode with the tiny model (~15 s a mutant): too slow here.
    "umarvel/retrieval/mining.py": ["tests/test_mining_positives.py",
                                    "tests/test_mining.py::test_select_negatives_removes_positives_then_filters_then_keeps_top_k"],
    "umarvel/retrieval/encode.py": ["tests/test_encode_resume.py", "tests/test_evaluation.py"],
    "umarvel/data/mbeir.py": ["tests/test_mbeir_reader.py", "tests/test_qrels.py", "tests/test_validate.py"],
    "umarvel/evaluation/metrics.py": ["tests/test_metrics.py", "tests/test_qrels.py"],
    "umarvel/training/gradcache.py": ["tests/test_gradcache.py", "tests/test_distributed.py"],
    "umarvel/retrieval/index.py": ["tests/test_index.py", "tests/test_metrics.py"],
    "umarvel/modeling/pooling.py": ["tests/test_embedder.py"],
    "umarvel/modeling/batches.py": ["tests/test_batches.py"],
}


def configure(work: Path, module: str, tests: list[str]) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("umarvel", "tests"):
        shutil.copytree(ROOT / folder, work / folder, ignore=ignore)
    settings = {
        "source_paths": ["umarvel"],
        "only_mutate": [module],
        "pytest_add_cli_args": ["-q", "-m", "not slow", "-p", "no:cacheprovider"],
        "pytest_add_cli_args_test_selection": tests,
        "process_isolation": "forkserver",  # torch is not fork-safe after the stats run
        "use_git_change_detection": False,
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + "\n[tool.mutmut]\n" + "\n".join(lines) + "\n")


def mutmut(work: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/ first
    env.update(OMP_NUM_THREADS="1", UMARVEL_CACHE=str(work / "cache"))
    process = subprocess.Popen([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        out += f"\n[stopped after {timeout:.0f} s]\n"
    return subprocess.CompletedProcess(process.args, process.returncode, out, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", help="a file under umarvel/, e.g. umarvel/training/losses.py")
    parser.add_argument("tests", nargs="*", help="test files (default: the module's entry in CORE)")
    parser.add_argument("--minutes", type=float, default=15.0, help="cap on the whole run (default 15)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--work", type=Path, help="scratch directory (default /tmp/umarvel-mutation/<module>)")
    args = parser.parse_args(argv)
    module = Path(args.module).as_posix()
    tests = args.tests or CORE.get(module)
    if not tests:
        parser.error(f"no tests known for {module}: name the test files")
    work = args.work or Path("/tmp/umarvel-mutation") / Path(module).stem
    configure(work, module, tests)
    run = mutmut(work, "run", "--max-children", str(args.max_children), timeout=args.minutes * 60)
    (work / "run.log").write_text(run.stdout)
    results = mutmut(work, "results", "--all", "true", timeout=300).stdout
    statuses = dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", results, flags=re.M))
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    print(f"{module}: {len(statuses)} mutants " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for name, status in statuses.items():
        if status == "survived":
            print(f"\n--- {name}\n" + mutmut(work, "show", name, timeout=300).stdout.strip())
    print(f"\nfull log: {work / 'run.log'}")
    return 0 if statuses else 1


if __name__ == "__main__":
    sys.exit(main())
