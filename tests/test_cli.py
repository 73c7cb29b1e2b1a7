"""The `umarvel` command: help, tiny model, config errors as one clear line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from umarvel.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_only_working_verbs():
    out = subprocess.run([sys.executable, "-m", "umarvel.cli", "--help"], capture_output=True, text=True, check=True)
    assert "make-tiny-model" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["make-tiny-model", "--out", "tiny"]])
def test_no_command_prints_deepspeeds_accelerator_warning(argv, tmp_path):
    """transformers imports DeepSpeed when saving a model; its CPU-fallback warning is noise here."""
    out = subprocess.run([sys.executable, "-m", "umarvel", *argv], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "accelerator" not in (out.stdout + out.stderr).lower(), out.stdout  # DeepSpeed logs to stdout


def test_make_tiny_model_through_the_cli(tmp_path):
    assert main(["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lora:\n    rank: 4\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.lora.rank: unknown key" in err and "Traceback" not in err


def test_config_prints_resolved_values(capsys):
    assert main(["config", "--set", "model.lora.r=32"]) == 0
    assert "r: 32" in capsys.readouterr().out


def test_unknown_verb_is_rejected():
    with pytest.raises(SystemExit):
        main(["fly"])
