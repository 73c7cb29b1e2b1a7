"""Non-finite numbers stop: a NaN or infinite float setting is a config error naming the key
(every float field of the schema), and a training whose loss or weights stop being finite ends
with an error naming the step, before model/, merged/ or DONE is written."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerControl

from umarvel.cli import main
from umarvel.config import Config, ConfigError, load_config
from umarvel.errors import UmarvelError
from umarvel.training.guards import FiniteWeights, check_loss

ROOT = Path(__file__).resolve().parents[1]


def _float_keys(cls, prefix: str = "") -> list[str]:
    """The dotted key of every float field of the config schema."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float:
            keys.append(f"{prefix}{f.name}")
    return keys


FLOAT_KEYS = _float_keys(Config)


def test_the_schema_has_the_float_fields_this_test_walks():
    assert {"train.learning_rate", "model.temperature.init", "mine.threshold", "distill.alpha"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_a_non_finite_float_setting_is_a_config_error_naming_the_key(key, value):
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
    with pytest.raises(ConfigError, match=rf"^config: {re.escape(key)}: {shown} is not a finite number"):
        load_config(None, [f"{key}={value}"])


def test_the_cli_refuses_a_nan_learning_rate_in_one_line(capsys):
    config = str(ROOT / "configs" / "tiny" / "progressive.yaml")
    assert main(["train", "--stage", "nli", "--config", config, "--set", "train.learning_rate=.nan"]) == 2
    assert capsys.readouterr().err == (f"umarvel: error: {config}: train.learning_rate: nan is not a finite number; "
                                       "it must be >= 0\n")


def test_a_non_finite_loss_stops_with_the_step_and_value():
    check_loss(torch.tensor(0.7), 4, 1e-4)
    with pytest.raises(UmarvelError, match=r"^training stopped at step 5: the loss is inf .*train\.learning_rate "
                                           r"\(now 0\.0001\).*nothing of this run was marked finished$"):
        check_loss(torch.tensor(math.inf), 5, 1e-4)


def test_non_finite_weights_stop_before_a_save():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model[0].weight.data[0, 0] = math.nan  # frozen: not the guard's business
    state, args = SimpleNamespace(global_step=7), SimpleNamespace(learning_rate=2e-3)
    control = TrainerControl(should_save=True)
    FiniteWeights().on_step_end(args, state, control, model=model)
    model[1].bias.data[1] = math.nan
    FiniteWeights().on_step_end(args, state, TrainerControl(), model=model)  # no save, no end: not checked
    with pytest.raises(UmarvelError, match=r"^training stopped at step 7: trainable weights are not finite \(e\.g\. 1\.bias\)"):
        FiniteWeights().on_step_end(args, state, control, model=model)


def test_a_diverging_training_stops_before_anything_is_marked_finished(tiny_workdir, capsys):
    """lr 1e30 (finite, so the config takes it): the update of step 2 blows up the LoRA weights,
    and step 3's loss is NaN."""
    code = main(["train", "--stage", "nli", "--config", str(ROOT / "configs" / "tiny" / "progressive.yaml"),
                 "--set", "run.output_dir=runs/diverge", "--set", "train.max_steps=3",
                 "--set", "train.per_device_batch_size=4", "--set", "train.learning_rate=1e30"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("umarvel: error: training stopped at step 3: the loss is nan")
    run = tiny_workdir / "runs" / "diverge" / "nli"
    assert (run / "run.json").is_file()
    assert not any((run / name).exists() for name in ("DONE", "model", "merged", "metrics.json"))
