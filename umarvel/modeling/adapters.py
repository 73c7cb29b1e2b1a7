"""Backbone + LoRA adapter loading shared by the embedder and the reranker: the saved-model
protocol (which directory a path means, the saved settings vs overrides, finding the backbone)."""
from __future__ import annotations

import json
import os
from abc import ABCMeta, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from umarvel import backbones, profiles
from umarvel.backbone import (
    check_backbone_dir, language_model, load_backbone, load_processor, quiet_transformers, resolve_device, resolve_dtype,
)
from umarvel.config import ConfigError, ModelConfig, deep_merge, from_dict
from umarvel.errors import UmarvelError
from umarvel.io import atomic_dir
from umarvel.weights import SAVED_MODEL, check_safetensors


def _lora_targets(backbone, suffixes: list[str]) -> list[str]:
    """Full names of the language model's nn.Linear layers (optionally only those ending in a suffix)."""
    decoder = language_model(backbone)
    prefix = next(name for name, module in backbone.named_modules() if module is decoder)
    names = [
        f"{prefix}.{name}"
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear) and (not suffixes or any(name.split(".")[-1] == s for s in suffixes))
    ]
    if not names:
        raise ConfigError(f"model.lora.target_modules {suffixes} matches no linear layer of the language model")
    return names


def attach_lora(backbone, config: ModelConfig):
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=_lora_targets(backbone, lora.target_modules),
        bias="none",
    )
    return get_peft_model(backbone, peft_config)


def resolve_saved_dir(path: str | os.PathLike, record: str, kind: str) -> Path:
    """A run directory means its final model, `model/`; a saved model (holding `record`) or a
    plain model directory (holding config.json) means itself."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / record).is_file() or (candidate / "config.json").is_file():
            return candidate
    raise UmarvelError(
        f"{path} is not a run directory, saved {kind} or model directory: "
        f"neither it nor {path / 'model'} holds {record} or config.json"
    )


def read_saved(path: Path, name: str, version: int) -> dict | None:
    """The saved-model record `name` in `path` (None when absent), checked for its format version."""
    saved_file = path / name
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


def model_config(base: dict, overrides: dict, where: str) -> ModelConfig:
    """Saved (or default) model settings with `overrides` on top; errors name `where`."""
    try:
        return from_dict(ModelConfig, deep_merge(base, overrides), "model")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


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


def model_kind(directory: Path, saved: dict | None) -> str:
    """A key of KINDS: a saved record says adapter or merged; a plain directory is a released
    checkpoint when its config.json names a released architecture, else a backbone."""
    from umarvel.modeling import release

    if saved is not None:
        return "merged" if saved.get("merged") else "adapter"
    check_backbone_dir(directory)  # a damaged directory is named as such before its config.json is read here
    return "released" if profiles.released_profile(release.architectures(directory)) else "backbone"


def inference_overrides(given: GivenSettings, kind: str, directory: Path) -> dict:
    """The one rule for saved vs given settings of a model loaded for inference (embedder and
    reranker alike): the overrides for `from_pretrained`, which lays them over the saved
    settings (or, for a plain directory, the defaults).

    Every inference setting given applies, `command` over `file`. A training-only setting
    (TRAINING_ONLY) in `command` for a trained model is an error naming it; in `file` it is
    left out. `backbone` from `command` is where an adapter's backbone is now (an error for
    any other kind: they hold their weights); from `file` it is left out. What is kept is
    validated here, before any weights load, and errors name the key.
    """
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


def backbone_record(backbone: str, adapter_dir: Path) -> dict:
    """The backbone relative to the adapter as well as absolute: a run tree copied or moved
    together with its backbone (or the earlier runs it continued from) still loads."""
    try:
        return {"backbone_relative": os.path.relpath(Path(backbone).resolve(), Path(adapter_dir).resolve())}
    except ValueError:  # another drive (Windows): no relative form
        return {}


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


def load_adapted(config: ModelConfig, backbone_dir: Path, adapter_dir: Path | None, trainable: bool, *,
                 attention: str, with_lm_head: bool = False) -> tuple[nn.Module, object, torch.device]:
    """(backbone with its saved or a fresh adapter, processor, device), frozen but for the adapter.

    A saved adapter is loaded (trainable or not); without one, a fresh LoRA is attached only
    for training, since an untrained LoRA changes nothing at inference.
    """
    device = resolve_device(config.device)
    backbone = load_backbone(
        backbone_dir, dtype=resolve_dtype(config.dtype, device), attn_implementation=config.attn_implementation,
        attention=attention, with_lm_head=with_lm_head,
    )
    backbone.requires_grad_(False)
    if adapter_dir is not None:
        from peft import PeftModel

        check_safetensors(adapter_dir / "adapter_model.safetensors", SAVED_MODEL)
        try:
            with quiet_transformers():
                backbone = PeftModel.from_pretrained(backbone, adapter_dir, is_trainable=trainable)
        except (OSError, ValueError) as err:  # a corrupt adapter_config.json is a JSONDecodeError
            raise UmarvelError(f"{adapter_dir}: the adapter does not load ({err}); the saved model is damaged: "
                               "save or train it again") from None
    elif trainable and config.lora.enabled:
        with quiet_transformers():
            backbone = attach_lora(backbone, config)
    family = backbones.of(backbone)
    processor = load_processor(backbone_dir, *family.pixel_bounds(config.prompt), image_backend=family.image_backend)
    config.backbone = str(backbone_dir.resolve())
    return backbone, processor, device


def gathered(parameters):
    """The block sees `parameters` whole; a no-op unless DeepSpeed ZeRO-3 partitions them.

    Collective under ZeRO-3 (every rank must enter with the same parameters); the gathered
    storage is freed on exit, so keep copies, not views.
    """
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class AdaptedBackbone(nn.Module, metaclass=ABCMeta):
    """Base of the embedder and the reranker: a `backbone` that may carry a PEFT adapter.

    Our model section lives in `settings`; `config` is the backbone's transformers config,
    which the Trainer's integrations (TensorBoard, wandb, DeepSpeed's `auto` sizes) read.
    A saved one is a directory holding its `record` file (what makes it a saved `kind`).
    """

    record: str
    kind: str

    @property
    def config(self):
        return self.backbone.config

    @property
    def family(self) -> backbones.Family:
        return backbones.of(self.backbone)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are loaded in (model.dtype `auto` resolves by device)."""
        return next(self.backbone.parameters()).dtype

    @property
    def has_adapter(self) -> bool:
        from peft import PeftModel

        return isinstance(self.backbone, PeftModel)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def write_adapter(self, directory: str | os.PathLike, *, write: bool = True, atomic: bool = False) -> Path:
        """Write the adapter and this model's own files into `directory` (a Trainer checkpoint;
        with `atomic`, built beside it and renamed in when complete).

        Under DeepSpeed ZeRO-3 the adapter is gathered first: every rank must call this, and
        only the one with `write` writes.
        """
        if not self.has_adapter:
            raise UmarvelError(f"this {type(self).__name__.lower()} has no adapter to save")
        with gathered(self.trainable_parameters()):
            if write:
                with (atomic_dir(directory, record=self.record, kind=self.kind) if atomic
                      else nullcontext(Path(directory))) as target:
                    target.mkdir(parents=True, exist_ok=True)
                    with quiet_transformers():
                        self.backbone.save_pretrained(target)
                    self._write_files(target)
        return Path(directory)

    @abstractmethod
    def _write_files(self, directory: Path) -> None:
        """This model's files beside the adapter (settings, processor, ...)."""

    @contextmanager
    def vision_on_every_rank(self, has_images: bool):
        """Run the backbone's forward in the block with the vision tower on every rank.

        Under ZeRO-3 each module's forward gathers its weights collectively, the frozen vision
        tower's too, so a batch without images on one rank while another has some hangs or
        aborts. Then the image-less ranks run the tower on a minimal dummy image (discarded)
        where the model runs it for real: after the token embeddings, before the language
        model. Costs one flag all-reduce per forward under ZeRO-3; nothing otherwise.
        """
        family = self.family
        visual = next(m for name, m in self.backbone.named_modules() if name.split(".")[-1] == family.vision_tower)
        if not any(hasattr(p, "ds_id") for p in visual.parameters()) or not torch.distributed.is_initialized():
            yield
            return
        anywhere = torch.tensor([int(has_images)], device=self.device)
        torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
        if has_images or not anywhere.item():
            yield
            return
        hook = language_model(self.backbone).register_forward_pre_hook(lambda *_: family.dummy_vision(visual), prepend=True)
        try:
            yield
        finally:
            hook.remove()
