"""DeepSpeed launcher worker: several `umarvel` commands in one launch, one after another in the
same process group, as `python -m umarvel` would run each of them under the launcher. A chain of
steps then pays for one launcher, interpreter start and process group instead of one per step.

Each step writes its output (stdout and stderr, at the file-descriptor level) to
LOGS/<step>.rank<R>.log and its exit code to LOGS/<step>.rank<R>.rc; the first failing step
ends the launch.

Usage: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_steps_worker.py --plan PLAN.json --logs DIR
PLAN.json: [[step name, [umarvel arguments...]], ...]
Tests call `launch`, which writes the plan, launches and reads each step's outcome back.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from umarvel.cli import _leave_process_group, run_command

ROOT = Path(__file__).resolve().parents[1]


class Step(NamedTuple):
    returncode: int
    output: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _deepspeed(workdir: Path, arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
               *arguments]
    # its own session: a launch that hangs past the timeout is ended with its ranks, which would
    # otherwise run on, orphaned (a guard, not a budget: a long chain at load 20 takes 15 minutes)
    launcher = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=2400)
        return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        raise
    finally:
        # DeepSpeed's CPU backend leaves a 69 MB shared-memory buffer per rank in /dev/shm, which
        # is RAM: launch after launch would hold GBs of it and starve the later ones.
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)


def launch(workdir: Path, steps: list[tuple[str, list[str]]]) -> dict[str, Step]:
    """Run `steps` ([(name, umarvel arguments), ...]) in order in one 2-rank launch from `workdir`:
    each step's exit code and both ranks' output, up to the first failing step. A step the launch
    died in gets the launcher's exit code and output besides its logs."""
    logs = workdir / "logs" / steps[0][0]
    plan = logs.with_suffix(".json")
    plan.parent.mkdir(exist_ok=True)
    plan.write_text(json.dumps([[name, arguments] for name, arguments in steps]))
    done = _deepspeed(workdir, [str(Path(__file__).resolve()), "--plan", str(plan), "--logs", str(logs)])
    outcome = {}
    for name, _ in steps:
        output = "".join(log.read_text() for log in sorted(logs.glob(f"{name}.rank*.log")))
        codes = [int(rc.read_text()) for rc in sorted(logs.glob(f"{name}.rank*.rc"))]
        if len(codes) < 2:
            if output or done.returncode != 0:
                outcome[name] = Step(done.returncode or 1, output + done.stdout[-3000:] + done.stderr[-3000:])
            break
        outcome[name] = Step(max(codes), output)
        if max(codes) != 0:
            break
    return outcome


@contextmanager
def _output_to(log: Path):
    """Send this process's stdout and stderr (Python's and the C libraries') to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    rank = os.environ.get("RANK", "0")
    args.logs.mkdir(parents=True, exist_ok=True)
    code = 0
    for name, arguments in json.loads(args.plan.read_text()):
        with _output_to(args.logs / f"{name}.rank{rank}.log"):
            try:
                code = run_command(arguments)
            except BaseException:  # a bug: its traceback goes to the step's log, the launch ends
                traceback.print_exc()
                code = 1
        (args.logs / f"{name}.rank{rank}.rc").write_text(str(code))
        if code != 0:
            break
    if code == 1:
        os._exit(1)  # the peer rank may wait in a collective: the launcher ends it
    _leave_process_group(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
