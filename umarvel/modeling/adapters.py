"""Backbone + LoRA adapter loading shared by the embedder and the reranker; both build from
the description of a model directory (model_dir.describe: which directory a path means, the
saved settings vs the given ones, where the backbone is)."""
from __future__ import annotations

import copy
import os
from abc import ABCMeta, abstractmethod
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from umarvel import backbones, profiles
from umarvel.backbone import language_model, load_backbone, load_processor, quiet_transformers, resolve_device, resolve_dtype
from umarvel.config import ConfigError, ModelConfig
from umarvel.errors import UmarvelError
from umarvel.io import atomic_dir
from umarvel.modeling.model_dir import GivenSettings, ModelDirectory, SavedModel, describe
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


def backbone_record(backbone: str, adapter_dir: Path) -> dict:
    """The backbone relative to the adapter as well as absolute: a run tree copied or moved
    together with its backbone (or the earlier runs it continued from) still loads."""
    try:
        return {"backbone_relative": os.path.relpath(Path(backbone).resolve(), Path(adapter_dir).resolve())}
    except ValueError:  # another drive (Windows): no relative form
        return {}


def load_adapted(config: ModelConfig, backbone_dir: Path, adapter_dir: Path | None, trainable: bool, *,
                 attention: str, with_lm_head: bool = False) -> tuple[nn.Module, object, torch.device]:
    """(backbone with its saved or a fresh adapter, processor, device), frozen but for the adapter.

    A saved adapter is loaded (trainable or not); without one, a fresh LoRA is attached only
    for training, since an untrained LoRA changes nothing at inference. The processor resizes
    within prompt.min_pixels/max_pixels, or within its saved bounds where the profile's rules
    say so (model.rules.processor_pixels=checkpoint).
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
    saved_bounds = profiles.resolve(config, family.name).processor_pixels == "checkpoint"
    bounds = () if saved_bounds else family.pixel_bounds(config.prompt)
    processor = load_processor(backbone_dir, *bounds, image_backend=family.image_backend)
    config.backbone = str(backbone_dir.resolve())
    return backbone, processor, device


def gathered(parameters, modifier_rank: int | None = None):
    """The block sees `parameters` whole; a no-op unless DeepSpeed ZeRO-3 partitions them.

    Collective under ZeRO-3 (every rank must enter with the same parameters); the gathered
    storage is freed on exit, so keep copies, not views. With `modifier_rank`, what that rank
    writes into them in the block is partitioned back to every rank on exit.
    """
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


class AdaptedBackbone(nn.Module, metaclass=ABCMeta):
    """Base of the embedder and the reranker: a `backbone` that may carry a PEFT adapter.

    Our model section lives in `settings`; `config` is the backbone's transformers config,
    which the Trainer's integrations (TensorBoard, wandb, DeepSpeed's `auto` sizes) read.
    A saved one is a directory holding its `record` file (what makes it a saved `kind`).
    """

    saved_as: SavedModel
    record: str
    kind: str
    generative = False  # a generative model (the reranker) loads its LM head and reads causally

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, trainable: bool = False, given: GivenSettings | None = None,
                        **overrides):
        """Load a saved model (adapter, merged) or wrap a plain model directory (a backbone or a
        released checkpoint); a run directory means its final model, `model/`.

        `overrides` are fields of the model config (e.g. pooling="last", device="cuda:1",
        profile="umarvel-release"), given now on top of `given` (a command's settings by
        origin); model_dir says how they meet the saved ones (for inference, a training-only
        one for a trained model is an error and backbone=PATH names the backbone of an adapter
        moved away from it; for training, a saved adapter keeps its own LoRA settings).
        """
        return cls.from_directory(describe(path, given, model=cls.saved_as, trainable=trainable, overrides=overrides),
                                  trainable=trainable)

    @classmethod
    def from_directory(cls, directory: ModelDirectory, *, trainable: bool = False):
        """The model `directory` describes (its adapter trainable with `trainable`)."""
        model = cls._build(copy.deepcopy(directory.config), directory.backbone_dir, directory.adapter_dir, trainable)
        model._loaded_from(directory)
        return model

    @classmethod
    def _build(cls, config: ModelConfig, backbone_dir: Path, adapter_dir: Path | None, trainable: bool):
        attention = "causal" if cls.generative else config.attention
        backbone, processor, device = load_adapted(config, backbone_dir, adapter_dir, trainable,
                                                   attention=attention, with_lm_head=cls.generative)
        return cls(backbone, processor, config).to(device)

    def _loaded_from(self, directory: ModelDirectory) -> None:
        """What this model takes from its directory beyond the weights (none by default)."""

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
