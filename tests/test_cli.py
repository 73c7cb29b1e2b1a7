"""The `umarvel` command: help, tiny model, config errors as one clear line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from umarvel.cli import main


def test_help_lists_only_working_verbs():
    out = subprocess.run([sys.executable, "-m", "umarvel.cli", "--help"], capture_output=True, text=True, check=True)
    assert "make-tiny-model" in out.stdout


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


def test_missing_faiss_names_the_extra_to_install(tmp_path):
    script = ("import sys; sys.modules['faiss'] = None\n"
              "from umarvel.cli import main\n"
              f"sys.exit(main(['eval', 'mbeir', '--model', '{tmp_path}', '--data', '{tmp_path}', '--output-dir', '{tmp_path}']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "FAISS is not installed" in done.stderr and "umarvel[cpu]" in done.stderr and "Traceback" not in done.stderr
