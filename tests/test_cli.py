"""The `umarvel` command: help, tiny model, config errors as one clear line."""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from umarvel.cli import EXAMPLES, build_parser, main

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


def _commands(parser):
    """Every (sub)command parser below `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield command
                yield from _commands(command)


def test_every_option_is_described_and_every_command_shows_examples_that_parse():
    parser = build_parser()
    commands = list(_commands(parser))
    assert len(commands) == 18
    for command in commands:
        for action in command._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, f"{command.prog} {action.option_strings}"
        assert "examples:\n  umarvel " in command.format_help(), command.prog
        for line in EXAMPLES[command.prog]:
            build_parser().parse_args(shlex.split(line)[1:])  # exits on an unknown flag or bad choice


def test_make_tiny_model_through_the_cli(tmp_path):
    assert main(["make-tiny-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lora:\n    rank: 4\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.lora.rank: unknown key" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--stage", "progressive"], ["train", "--stage", "hardneg"], ["distill"]])
def test_training_without_a_config_says_one_is_needed_and_where_they_are(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"`umarvel {argv[0]}` needs --config FILE" in err and "configs/tiny/" in err and "configs/umarvel/" in err
    assert len(err.strip().splitlines()) == 1


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
