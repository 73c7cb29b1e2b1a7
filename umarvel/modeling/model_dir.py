"""What a model directory is, read in one place: `describe` says which directory a path means,
what kind it is, where its backbone and adapter are, its family and profile, and the settings
to build the model with; the embedder and the reranker both build from that description.

A path means
- a run directory (it holds `model/`): its final model, `model/`;
- a saved embedder or reranker (its record, `embedder_config.json` or `reranker_config.json`):
  a trained adapter, whose backbone is found as recorded (absolute, then relative to the
  adapter) or where `backbone` is given, or (embedder only) a merged checkpoint;
- a plain model directory (config.json): a released checkpoint when its architectures are a
  release's (profiles.released_profile), else a backbone.

Saved vs given settings, the one rule. Settings come from the saved record (a plain directory:
the defaults) and, for one command, from a config file and from what is given now (`--set
model.*`, --profile, keyword arguments); see `GivenSettings`.
- For inference, every inference-time setting given wins over the saved one, `command` over
  `file`. Training-only settings (TRAINING_ONLY: the adapter's shape, the temperature) of a
  trained model come from its saved record: given now they are an error naming them, in a
  config file they are left out. `backbone` given now is where an adapter's backbone is now
  (an error for the other kinds, which hold their weights); in a config file it is left out.
  An untrained backbone takes every setting.
- For training (`trainable`), the given settings configure the run; a saved adapter keeps its
  own LoRA settings.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from umarvel import backbones, profiles
from umarvel.backbone import check_backbone_dir
from umarvel.config import ConfigError, ModelConfig, deep_merge, from_dict
from umarvel.errors import UmarvelError
from umarvel.modeling import release
from umarvel.weights import SAVED_MODEL, load_tensors

EMBEDDER_CONFIG = "embedder_config.json"
RERANKER_CONFIG = "reranker_config.json"
TEMPERATURE_FILE = "temperature.safetensors"


@dataclass(frozen=True)
class SavedModel:
    """What a saved model of one type holds: its record file (and format version), the settings a
    plain directory starts from, and how to make one (for errors)."""

    name: str
    article: str  # "an embedder", "a reranker"
    record: str
    version: int
    plain_defaults: tuple[tuple[str, str], ...]
    made_by: str


EMBEDDER = SavedModel("embedder", "an", EMBEDDER_CONFIG, 1, (), "umarvel train")
RERANKER = SavedModel("reranker", "a", RERANKER_CONFIG, 1, (("attention", "causal"),), "umarvel train --stage reranker")
SAVED_MODELS = (EMBEDDER, RERANKER)

# Model settings that shape training only: a trained model's are fixed by its training (the
# adapter's shape, the learned temperature), so at inference they could only be ignored.
TRAINING_ONLY = ("lora", "temperature", "gradient_checkpointing")
# What a model directory holds, as far as settings go: an untrained backbone takes every setting.
KINDS = {"backbone": "a backbone", "adapter": "a trained adapter", "merged": "a merged checkpoint",
         "released": "a released checkpoint"}


@dataclass(frozen=True)
class GivenSettings:
    """The model settings given for one command, raw (what was written, not the schema's
    defaults) and kept apart by origin: `file`, a config file's model section (a training
    recipe: its training-only keys and backbone describe training, not the model loaded now);
    `command`, what was asked for this command (`--set model.*`, --profile, the device)."""

    file: dict = field(default_factory=dict)
    command: dict = field(default_factory=dict)

    def and_now(self, overrides: dict) -> "GivenSettings":
        """These settings with a call's keyword overrides on top (given now, like `--set`)."""
        return GivenSettings(self.file, deep_merge(self.command, overrides))


@dataclass(frozen=True)
class ModelDirectory:
    """One model directory as `describe` read it: build the model from `config` on
    `backbone_dir`, with the adapter of `adapter_dir` when there is one."""

    path: Path  # the directory read (a run directory's model/)
    run_dir: Path | None  # the run directory `path` was found in, if any
    model: SavedModel
    kind: str  # a key of KINDS
    saved: dict | None  # the saved record, None for a plain directory
    backbone_dir: Path
    adapter_dir: Path | None
    family: backbones.Family
    released_as: profiles.Profile | None  # the profile whose release this checkpoint is
    config: ModelConfig

    def saved_temperature(self) -> dict | None:
        """The embedder's saved temperature state: its temperature file (a saved embedder), a
        released checkpoint's `sim.temp` weight, or None (a plain backbone has none)."""
        if self.saved is not None:
            return load_tensors(self.path / TEMPERATURE_FILE, SAVED_MODEL)
        import torch

        tau = release.checkpoint_temperature(self.path)
        return None if tau is None else {"tau": torch.tensor([tau])}


def describe(path: str | os.PathLike, given: GivenSettings | None = None, *, model: SavedModel = EMBEDDER,
             trainable: bool = False, overrides: dict | None = None) -> ModelDirectory:
    """The description of the model directory `path` for a `model` (EMBEDDER or RERANKER), with
    the settings `given` for a command and `overrides` given now (module docstring: the rule)."""
    overrides = dict(overrides or {})
    directory = locate(path, model)
    run_dir = Path(path) if directory != Path(path) else None
    saved = read_saved(directory / model.record, model.version)
    kind = directory_kind(directory, saved)
    if not trainable:
        given = (given or GivenSettings()).and_now(overrides)
        overrides = inference_overrides(given, kind, directory)
    where = str(directory / model.record) if saved is not None else str(directory)
    adapter_dir = None
    if saved is None:
        backbone_dir = directory
        config = model_config({"backbone": str(directory), **dict(model.plain_defaults)}, overrides, where)
    elif saved.get("merged"):
        backbone_dir = directory
        config = model_config(saved["model"], {**overrides, "backbone": str(directory)}, where)
    else:
        overrides.pop("lora", None)
        backbone_dir = find_backbone(directory, saved, given=overrides.pop("backbone", None))
        adapter_dir = directory
        config = model_config(saved["model"], overrides, where)
    released_as = profiles.released_profile(release.architectures(directory)) if kind == "released" else None
    if released_as and not trainable and released_as.name != config.profile:
        logging.getLogger(__name__).info("%s is a released U-MARVEL checkpoint; its official inference is "
                                         "reproduced with --profile %s", directory, released_as.name)
    return ModelDirectory(path=directory, run_dir=run_dir, model=model, kind=kind, saved=saved,
                          backbone_dir=backbone_dir, adapter_dir=adapter_dir, family=check_backbone_dir(backbone_dir),
                          released_as=released_as, config=config)


def locate(path: str | os.PathLike, model: SavedModel = EMBEDDER) -> Path:
    """The directory `path` means for a `model`: a run directory means its final model,
    `model/`; a saved model (holding its record) or a plain model directory (holding
    config.json) means itself. Another type's saved model is an error saying which it is."""
    path = Path(path)
    for other in SAVED_MODELS:
        if other is not model and any((c / other.record).is_file() for c in (path, path / "model")):
            raise UmarvelError(f"{path} is {other.article} {other.name}, not {model.article} {model.name} (train one with "
                               f"`{model.made_by}`)")
    for candidate in (path, path / "model"):
        if (candidate / model.record).is_file() or (candidate / "config.json").is_file():
            return candidate
    raise UmarvelError(
        f"{path} is not a run directory, saved {model.name} or model directory: "
        f"neither it nor {path / 'model'} holds {model.record} or config.json"
    )


def read_saved(saved_file: Path, version: int) -> dict | None:
    """The saved-model record `saved_file` (None when absent), checked for its format version."""
    if not saved_file.is_file():
        return None
    try:
        saved = json.loads(saved_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UmarvelError(f"{saved_file}: not valid JSON ({err}); the saved model is damaged: save or train "
                           "it again") from None
    if not isinstance(saved, dict):
        raise UmarvelError(f"{saved_file}: expected a JSON object; the saved model is damaged: save or train it again")
    if saved.get("format_version") != version:
        raise UmarvelError(f"{saved_file}: unsupported format {saved.get('format_version')!r} (expected {version})")
    return saved


def directory_kind(directory: Path, saved: dict | None) -> str:
    """A key of KINDS: a saved record says adapter or merged; a plain directory is a released
    checkpoint when its config.json names a released architecture, else a backbone."""
    if saved is not None:
        return "merged" if saved.get("merged") else "adapter"
    check_backbone_dir(directory)  # a damaged directory is named as such before its config.json is read here
    return "released" if profiles.released_profile(release.architectures(directory)) else "backbone"


def model_config(base: dict, overrides: dict, where: str) -> ModelConfig:
    """Saved (or default) model settings with `overrides` on top; errors name `where`."""
    try:
        return from_dict(ModelConfig, deep_merge(base, overrides), "model")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def inference_overrides(given: GivenSettings, kind: str, directory: Path) -> dict:
    """The overrides of a model loaded for inference by the module's rule, laid over the saved
    settings (or, for a plain directory, the defaults); validated here, before any weights
    load, with errors naming the key."""
    file = {key: value for key, value in given.file.items() if key != "backbone"}
    command = dict(given.command)
    trained = kind != "backbone"
    if trained:
        fixed = [key for key in _dotted(command) if key.split(".")[0] in TRAINING_ONLY]
        if fixed:
            raise ConfigError(f"model.{fixed[0]}: shapes training only, and {directory} is {KINDS[kind]} whose "
                              f"{fixed[0].split('.')[0]} is fixed by its training; leave it out")
        file = {key: value for key, value in file.items() if key not in TRAINING_ONLY}
    backbone = command.pop("backbone", None)
    if backbone and kind != "adapter":
        raise ConfigError(f"model.backbone: {directory} is {KINDS[kind]}, not an adapter; it holds its own "
                          "weights, so no backbone can be given for it")
    overrides = deep_merge(file, command)
    profiles.resolve(model_config({}, overrides, f"settings given for {directory}"))
    return {**overrides, "backbone": backbone} if backbone else overrides


def _dotted(section: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a nested mapping, dotted (`lora.r`), in order."""
    keys = []
    for key, value in section.items():
        keys.extend(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"])
    return keys


def find_backbone(adapter_dir: Path, saved: dict, given: str | None = None) -> Path:
    """The backbone directory an adapter was trained on: `given` when the user names one, else
    as recorded (absolute), else relative to the adapter."""
    if given:
        candidates = [Path(given)]
    else:
        recorded, relative = saved["model"]["backbone"], saved.get("backbone_relative")
        candidates = [Path(recorded), adapter_dir / recorded] + ([adapter_dir / relative] if relative else [])
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    if given:
        raise UmarvelError(f"backbone {given}, given for the adapter {adapter_dir}, is not a model directory (no config.json)")
    tried = " nor at ".join(dict.fromkeys(str(c) for c in candidates))
    raise UmarvelError(
        f"{adapter_dir}: its backbone is found neither at {tried}; point to it with "
        "`--set model.backbone=PATH` on the command line or backbone=PATH in from_pretrained"
    )
