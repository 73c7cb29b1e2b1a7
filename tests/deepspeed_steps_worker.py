"""DeepSpeed launcher worker: several `umarvel` commands in one launch, one after another in the
same process group, as `python -m umarvel` would run each of them under the launcher. A chain of
steps then pays for one launcher, interpreter start and process group instead of one per step.

Each step writes its output (stdout and stderr, at the file-descriptor level) to
LOGS/<step>.rank<R>.log and its exit code to LOGS/<step>.rank<R>.rc; the first failing step
ends the launch.

Usage: DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/deepspeed_steps_worker.py --plan PLAN.json --logs DIR
PLAN.json: [[step name, [umarvel arguments...]], ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from umarvel.cli import _leave_process_group, run_command


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
