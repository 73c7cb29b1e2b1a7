"""What the system or a user's file does wrong ends the command as one line naming the path,
exit 2, no traceback: a full disk, an unwritable output directory, an output path that is (or
runs through) a file, a config that is not UTF-8 or not YAML. Ctrl-C ends it as one line, exit
130, in the main process and its DataLoader workers alike. A programming error keeps its
traceback. Each system error class (several paths, read-only file system, missing file, text
not UTF-8, PIL's pixel limit) has its one line checked exactly.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from umarvel.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    """The command's one `umarvel: error:` line on stderr (beside its progress bars), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("umarvel: ")]
    assert len(lines) == 1 and lines[0].startswith("umarvel: error: "), err
    return lines[0]


def _eval_args(model, data, out: Path, cache: Path) -> list[str]:
    return ["eval", "mbeir", "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--cache-dir", str(cache), "--pool", "local", "--set", "eval.mbeir.rows=[mscoco_task0]"]


def _full_disk_when_writing(monkeypatch, name_prefix: str) -> None:
    """Writes of bytes into a file whose name starts with `name_prefix` (the atomic writers' temp
    files are `.<target>.*.tmp`) fail as on a full disk: OSError(ENOSPC) naming no file."""
    def failing(write):
        def fake(self, *args, **kwargs):
            if self.name.startswith(name_prefix):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(self, *args, **kwargs)
        return fake
    monkeypatch.setattr(Path, "write_text", failing(Path.write_text))
    monkeypatch.setattr(Path, "write_bytes", failing(Path.write_bytes))


def test_a_full_disk_while_writing_results_names_the_results_file(tiny_model_dir, synthetic_dir, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "eval"
    _full_disk_when_writing(monkeypatch, ".results.json.")
    assert main(_eval_args(tiny_model_dir, synthetic_dir, out, tmp_path / "cache")) == 2
    assert _one_error_line(capsys) == (f"umarvel: error: {out / 'local' / 'results.json'}: No space left on device "
                                       "(the disk is full: free space there or write elsewhere)")
    assert not list((out / "local").glob(".results.json.*"))  # no temp file left behind


def test_a_full_disk_while_writing_a_cache_shard_names_the_shard(tiny_model_dir, synthetic_dir, tmp_path,
                                                                 monkeypatch, capsys):
    """np.save into an open file reports a failed write with no file name."""
    save = np.save

    def fake_save(file, array, *args, **kwargs):
        if ".shard-00000.npy." in str(getattr(file, "name", file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", fake_save)
    assert main(_eval_args(tiny_model_dir, synthetic_dir, tmp_path / "eval", tmp_path / "cache")) == 2
    line = _one_error_line(capsys)
    shard = line.removeprefix("umarvel: error: ").split(":")[0]
    assert Path(shard).name == "shard-00000.npy" and Path(shard).is_relative_to(tmp_path / "cache")
    assert line.endswith(": No space left on device (the disk is full: free space there or write elsewhere)")
    assert not Path(shard).exists() and not list(Path(shard).parent.glob(".shard-*"))


def test_a_read_only_output_directory_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    """Tests run as root, where chmod 0o555 stops no write: the temp file's creation fails as it
    does in a read-only directory (EACCES naming the temp file, which the user never chose)."""
    mkstemp = tempfile.mkstemp

    def fake_mkstemp(suffix=None, prefix=None, dir=None, *args, **kwargs):
        if prefix == ".nli_for_simcse.csv.":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}x1y2z3{suffix}"))
        return mkstemp(suffix, prefix, dir, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", fake_mkstemp)
    out = tmp_path / "synthetic"
    assert main(["data", "synth", "--out", str(out), "--size", "tiny"]) == 2
    assert _one_error_line(capsys) == (f"umarvel: error: {out / 'nli_for_simcse.csv'}: Permission denied (check the "
                                       "permissions of the file and its directory, or choose another path)")


@pytest.mark.parametrize("under", [False, True], ids=["the output path is a file", "the output path runs through a file"])
def test_an_output_path_that_is_a_file_names_the_file(tiny_model_dir, synthetic_dir, tmp_path, capsys, under):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("precious\n")
    out = blocker / "eval" if under else blocker
    assert main(_eval_args(tiny_model_dir, synthetic_dir, out, tmp_path / "cache")) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"umarvel: error: {blocker}")
    assert line.endswith(f"({blocker} is a file, not a directory: choose another path)")
    assert blocker.read_text() == "precious\n"


def _config_error(path: Path, capsys) -> str:
    assert main(["config", "--config", str(path)]) == 2
    return _one_error_line(capsys)


def test_a_config_that_is_not_utf8_names_the_file_the_byte_and_the_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  backbone: caf\u00e9\n".encode("latin-1"))
    assert _config_error(bad, capsys) == (f"umarvel: error: {bad}: not UTF-8 text at byte 22 (line 2): "
                                          "invalid continuation byte; save it as UTF-8")
    child = tmp_path / "child.yaml"
    child.write_text("inherit: latin1.yaml\nencode:\n  batch_size: 2\n")
    assert _config_error(child, capsys).startswith(f"umarvel: error: {bad}: not UTF-8 text at byte 22 (line 2)")


@pytest.mark.parametrize("text, where", [
    ("model:\n  lora: {r: 8\nencode:\n  batch_size: 2\n",
     "line 3, column 7: expected ',' or '}', but got ':' (while parsing a flow mapping)"),
    ("encode:\n  batch_size: 2\n   shard_size: 3\n", "line 3, column 14: mapping values are not allowed here"),
    ("encode:\n  batch_size: 2\x07\n", "line 2, column 16: character #x0007: special characters are not allowed"),
], ids=["unclosed flow mapping", "bad indentation", "control character"])
def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_the_line(tmp_path, capsys, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert _config_error(bad, capsys) == f"umarvel: error: {bad}: not valid YAML: {where}"


def test_a_programming_error_keeps_its_traceback(monkeypatch):
    from umarvel.data import synthetic

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(synthetic, "write_synthetic", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["data", "synth", "--out", "x"])


def test_a_launched_rank_exits_with_one_line_on_a_system_error(tmp_path):
    """Inside a process group the command leaves it and exits 2 (through `_leave_process_group`),
    not with a traceback."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    script = ("import sys, torch.distributed as dist\n"
              f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', rank=0, world_size=1)\n"
              "from umarvel.cli import main\n"
              f"main(['data', 'synth', '--out', '{blocker / 'out'}', '--size', 'tiny'])\n"
              "sys.exit(1)  # not reached: main leaves the process group with os._exit\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"({blocker} is a file, not a directory: choose another path)")


SLOW_WORKERS = """
import sys, time
from umarvel.modeling import batches
collate = batches.SafeCollate.__call__

def slow(self, indexed):  # runs in the DataLoader workers: each batch takes a while
    print("collating", file=sys.stderr, flush=True)
    time.sleep(0.5)
    return collate(self, indexed)

batches.SafeCollate.__call__ = slow
from umarvel.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_encoding_exits_130_with_one_line_and_no_traceback(tiny_model_dir, synthetic_dir, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, while two DataLoader workers
    prepare batches: the command, and each worker, stop without a traceback."""
    args = [*_eval_args(tiny_model_dir, synthetic_dir, tmp_path / "eval", tmp_path / "cache"),
            "--set", "encode.num_workers=2", "--set", "encode.batch_size=1"]
    command = subprocess.Popen([sys.executable, "-c", SLOW_WORKERS, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    seen = []
    try:
        for line in command.stderr:
            seen.append(line)
            if "collating" in line:
                time.sleep(0.3)  # the workers are inside a batch
                os.killpg(command.pid, signal.SIGINT)
                break
        err = "".join(seen) + command.stderr.read()
        assert command.wait(timeout=120) == 130, err
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.count("umarvel: interrupted\n") == 1 and "umarvel: error" not in err
    assert not (tmp_path / "eval" / "local" / "results.json").exists()


def _collate_interrupted_in_workers(items: list[dict]) -> dict:
    """Collates; in a DataLoader worker, first sends itself the SIGINT a terminal's Ctrl-C sends."""
    import multiprocessing

    import torch

    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGINT)
    return {"values": torch.tensor([item["value"] for item in items])}


def test_dataloader_workers_leave_ctrl_c_to_the_main_process():
    """A worker that took SIGINT used to stop on its own (torch swallows its KeyboardInterrupt),
    leaving its batch undelivered; now it ignores it and the main process alone decides."""
    import torch

    from umarvel.modeling.batches import batches

    items = [{"value": float(i)} for i in range(6)]
    out = list(batches(items, _collate_interrupted_in_workers, keys=list(range(6)), batch_size=1,
                       device=torch.device("cpu"), num_workers=2))
    assert sorted(float(batch["values"][0]) for _, batch in out) == [float(i) for i in range(6)]


def _pixel_limit_error() -> Exception:
    from PIL import Image

    return Image.DecompressionBombError("Image size (200000000 pixels) exceeds limit of 178956970 pixels, "
                                        "could be decompression bomb DOS attack.")


@pytest.mark.parametrize("error, line", [
    (lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/a.json", None, "/out/.a.json.x.tmp"),
     "/out/a.json -> /out/.a.json.x.tmp: No space left on device (the disk is full: free space there or write elsewhere)"),
    (lambda: OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/results.json"),
     "/mnt/ro/results.json: Read-only file system (a read-only file system: choose a writable directory)"),
    (lambda: FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/pool.jsonl"),
     "/data/pool.jsonl: No such file or directory (check the path)"),
    (lambda: UnicodeDecodeError("utf-8", b"ok\n\xff", 3, 4, "invalid start byte"),
     "a file is not UTF-8 text: invalid start byte at byte 3 (convert it to UTF-8, e.g. with iconv)"),
    (_pixel_limit_error, "Image size (200000000 pixels) exceeds limit of 178956970 pixels, could be decompression "
                         "bomb DOS attack. (an image larger than PIL's pixel limit)"),
], ids=["disk full, two paths", "read-only file system", "missing file", "not UTF-8", "PIL pixel limit"])
def test_the_systems_errors_become_one_line(error, line):
    from umarvel.errors import system_error_message

    assert system_error_message(error()) == line
    assert system_error_message(RuntimeError("a bug")) is None and system_error_message(KeyError("k")) is None
