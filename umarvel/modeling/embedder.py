"""The U-MARVEL embedder: a backbone of a supported family + LoRA + pooling + L2 normalisation + temperature.

A saved embedder directory holds `embedder_config.json` (the model section of the config),
`temperature.safetensors`, the processor files, and either a PEFT adapter (whose backbone is
the directory named in the config, absolute and relative to the adapter) or, after
`merge_and_save`, the merged backbone itself.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from umarvel import profiles
from umarvel.backbone import language_model, quiet_transformers, set_attention_mode
from umarvel.config import ModelConfig, to_dict
from umarvel.data.collator import Collator
from umarvel.io import atomic_dir, atomic_write_json
from umarvel.modeling import batches, release
from umarvel.modeling.adapters import AdaptedBackbone, backbone_record, gathered
from umarvel.modeling.model_dir import EMBEDDER, EMBEDDER_CONFIG, TEMPERATURE_FILE, GivenSettings, ModelDirectory
from umarvel.modeling.inputs import as_items, check_batch_size, cosine_similarity, shaped
from umarvel.modeling.pooling import pool
from umarvel.modeling.temperature import Temperature
from umarvel.progress import progress_bar
from umarvel.weights import CHECKPOINT, load_tensors

FORMAT_VERSION = EMBEDDER.version
NAMED_PROMPTS = {"query": "", "document": ""}
"""sentence-transformers' named prompts: a prompt here is an instruction, masked out of the pool;
empty means none (the training's queries carry their task's instruction, candidates none)."""


class Embedder(AdaptedBackbone):
    """Encode items (`text`, `image`, optional `instruction`) into unit vectors."""

    saved_as = EMBEDDER
    record, kind = EMBEDDER.record, EMBEDDER.name

    def __init__(self, backbone, processor, config: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.settings = config
        t = config.temperature
        self.temperature = Temperature(t.init, t.learnable, t.min, t.max)
        self.rules = profiles.resolve(config, self.family.name)
        if self.rules.release_template:
            release.prepare_backbone(backbone, processor.tokenizer, self.rules.marker_rows)
        self.collator = self._collator()
        self.prompts = dict(NAMED_PROMPTS)
        if config.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, *, trainable: bool = False) -> "Embedder":
        """A fresh embedder on `config.backbone`; with `trainable`, a new LoRA adapter is attached."""
        return cls._build(config, Path(config.backbone), adapter_dir=None, trainable=trainable)

    def _loaded_from(self, directory: ModelDirectory) -> None:
        """The saved temperature (a released checkpoint's `sim.temp`) replaces the configured one."""
        state = directory.saved_temperature()
        if state is not None:
            self.temperature.load_state(state)

    # ----- forward and encode -----------------------------------------------------------
    def forward(self, input_ids, attention_mask, pool_mask, **multimodal) -> torch.Tensor:
        """Unit-norm float32 embeddings of a collated batch, under the profile's position and
        attention rules."""
        inputs = {k: v for k, v in multimodal.items() if k in self.family.model_inputs and v is not None}
        if self.rules.positions == "1d":
            # what the released model saw: position_ids=None reached its text model, so every
            # token (image tokens too) got arange positions on all three M-RoPE axes
            inputs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        has_vision = "pixel_values" in inputs or "pixel_values_videos" in inputs
        with self.vision_on_every_rank(has_vision), self._attention_for(attention_mask), self._deepstack_rule():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
        pooled = pool(out.last_hidden_state.float(), attention_mask, pool_mask, self.settings.pooling)
        return F.normalize(pooled, dim=-1)

    @contextmanager
    def _attention_for(self, attention_mask: torch.Tensor):
        """Causal for this batch when the rules say unpadded batches run causally (the released
        model's mask builder skipped its bidirectional mask when nothing was padded)."""
        causal_now = (self.rules.unpadded_causal and self.settings.attention == "bidirectional"
                      and bool(attention_mask.bool().all()))
        if not causal_now:
            yield
            return
        set_attention_mode(self.backbone, "causal")
        try:
            yield
        finally:
            set_attention_mode(self.backbone, "bidirectional")

    @contextmanager
    def _deepstack_rule(self):
        """Without DeepStack features while `rules.deepstack` is off (the released Qwen3-VL
        model ran its text model on the merged image tokens alone); a no-op for families
        without them."""
        if self.rules.deepstack:
            yield
            return

        def drop_deepstack(module, args, kwargs):
            return args, {**kwargs, **{key: None for key in ("deepstack_visual_embeds", "visual_pos_masks") if key in kwargs}}

        handle = language_model(self.backbone).register_forward_pre_hook(drop_deepstack, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return self.collator(items)

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = self.device
        return self(**{k: v.to(device) for k, v in batch.items()})

    def encode(self, inputs, *, prompt_name: str | None = None, prompt: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, num_workers: int | None = None, bar=None):
        """Unit vectors of `inputs`: strs (text), PIL images, pathlib.Paths (image files), item
        dicts, or one of them alone (umarvel.modeling.inputs says how each is read).

        Options are keyword-only and follow sentence-transformers' `encode`: `prompt` (or
        `prompt_name`, a key of `self.prompts`) is the instruction given to every item without its
        own, masked out of the pool as in training; a numpy array by default, a stacked tensor
        with convert_to_tensor, a list of 1-D tensors when both are off; 1-D for a single input.
        The L2 normalisation is part of the model (as a sentence-transformers Normalize module),
        so vectors are unit norm either way; normalize_embeddings renormalises. `num_workers` and
        `bar` are the input pipeline's (see `_encode_items`).
        """
        items, single = as_items(inputs, self.chosen_prompt(prompt_name, prompt))
        embeddings = self._encode_items(items, check_batch_size(batch_size), bool(show_progress_bar),
                                        num_workers=num_workers, bar=bar)
        return shaped(embeddings, single=single, convert_to_numpy=convert_to_numpy,
                      convert_to_tensor=convert_to_tensor, normalize_embeddings=normalize_embeddings)

    def chosen_prompt(self, prompt_name: str | None, prompt: str | None) -> str | None:
        """The instruction `encode` gives: `prompt` itself, or the named one of `self.prompts`
        (an empty named prompt means none). Naming an unknown prompt is an error, as in
        sentence-transformers; giving both is one too, since silently preferring one would drop
        the other."""
        if prompt_name is not None and prompt is not None:
            raise ValueError(f"give prompt or prompt_name, not both (prompt_name={prompt_name!r}, prompt={prompt!r})")
        if prompt_name is None:
            return prompt
        if prompt_name not in self.prompts:
            raise ValueError(f"prompt_name {prompt_name!r} is not one of this embedder's prompts "
                             f"{sorted(self.prompts)}; add it to embedder.prompts or pass prompt=")
        return self.prompts[prompt_name] or None

    def encode_query(self, inputs, instruction: str | None = None, **kwargs):
        """`encode` for queries: `instruction` (the task's, e.g. "Retrieve an image that matches the
        caption.") leads every query without one of its own and is masked out of the pool;
        without any, the "query" prompt of `self.prompts` is used, as in sentence-transformers."""
        if instruction is not None:
            if kwargs.get("prompt") is not None or kwargs.get("prompt_name") is not None:
                raise ValueError("give instruction, prompt or prompt_name, not several")
            kwargs["prompt"] = instruction
        return self.encode(inputs, **_with_prompt_name(kwargs, "query"))

    def encode_document(self, inputs, **kwargs):
        """`encode` for candidates, which carry no instruction in training: the "document" prompt
        of `self.prompts` (empty unless set) unless a prompt is given."""
        return self.encode(inputs, **_with_prompt_name(kwargs, "document"))

    def _collator(self) -> Collator:
        """The collator of the current prompt settings and profile rules."""
        return Collator(self.processor, self.settings.prompt, self.family,
                        mask_instruction=self.settings.mask_instruction, rules=self.rules)

    @contextmanager
    def prompt_overridden(self, **fields):
        """Encode with these PromptConfig fields changed (a benchmark's own prompt choice, e.g. the
        "in one word" suffix of Flickr and COCO), restored on exit."""
        saved = self.settings.prompt, self.collator
        self.settings.prompt = dataclasses.replace(saved[0], **fields)
        self.collator = self._collator()
        try:
            yield self
        finally:
            self.settings.prompt, self.collator = saved

    @staticmethod
    def similarity(a, b) -> torch.Tensor:
        """Cosine similarity matrix (len(a), len(b)) of two sets of embeddings."""
        return cosine_similarity(a, b)

    def _encode_items(self, items: list[dict], batch_size: int = 16, show_progress: bool = False, *,
               num_workers: int | None = None, bar=None) -> torch.Tensor:
        """(n, d) float32 unit vectors on CPU, in item order, without autograd: under inference
        mode, or plain no_grad for a model in training mode (validation during training: ZeRO-3
        weights gathered as inference tensors would break the next backward).

        Batches are formed by estimated length to limit padding (or, under model.rules.batching
        'file:N', N items at a time in item order, whatever `batch_size` says: the rules' vectors
        depend on their batch) and prepared by `num_workers` worker processes while the model runs
        (None: the default of `batches.default_workers`, 0: in-process). `bar`, a `umarvel.progress` bar, advances
        by items; else `show_progress` shows one.
        """
        was_training = self.training
        self.eval()
        bounds, unit = self.family.pixel_bounds(self.settings.prompt), self.family.pixel_unit
        if self.rules.fixed_batch:
            batch_size, keys = self.rules.fixed_batch, [0] * len(items)
        else:
            keys = [batches.estimated_tokens(item, bounds, unit) for item in items]
        progress = bar if bar is not None else progress_bar(len(items), "encode", "item", enabled=show_progress)
        try:
            with torch.inference_mode(not was_training), torch.no_grad():
                return batches.encode_rows(
                    lambda batch: self(**batch), items, self.collate,
                    keys=keys, batch_size=batch_size,
                    device=self.device, width=self.backbone.config.get_text_config().hidden_size,
                    num_workers=num_workers, bar=progress,
                )
        finally:
            if bar is None:
                progress.close()
            self.train(was_training)

    # ----- saving -------------------------------------------------------------------------
    def _write_common(self, directory: Path, merged: bool) -> None:
        record = {"format_version": FORMAT_VERSION, "merged": merged, "model": to_dict(self.settings)}
        if not merged:
            record.update(backbone_record(self.settings.backbone, directory))
        atomic_write_json(directory / EMBEDDER_CONFIG, record)
        save_file(self.temperature.state(), str(directory / TEMPERATURE_FILE))
        self.processor.save_pretrained(directory)

    def _write_files(self, directory: Path) -> None:
        self._write_common(directory, merged=False)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load a saved adapter's weights and temperature into this embedder (resume)."""
        from peft import set_peft_model_state_dict

        directory = Path(directory)
        set_peft_model_state_dict(self.backbone, load_tensors(directory / "adapter_model.safetensors", CHECKPOINT))
        self.temperature.load_state(load_tensors(directory / TEMPERATURE_FILE, CHECKPOINT))

    def save_pretrained(self, directory: str | os.PathLike, *, write: bool = True) -> Path:
        """Adapter + embedder config + temperature (a merged checkpoint when there is no adapter).

        Collective under ZeRO-3, like `write_adapter`.
        """
        if not self.has_adapter:
            return self.merge_and_save(directory, write=write)
        return self.write_adapter(directory, write=write, atomic=True)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights with every LoRA delta folded in, under the plain model's key names."""
        return dict(self._merged_tensors())

    def _merged_tensors(self):
        """(key, tensor) of the merged backbone; under ZeRO-3 one layer is gathered at a time
        (collective) and the tensors are CPU copies."""
        from peft.tuners.lora import LoraLayer

        base = self.backbone.get_base_model() if self.has_adapter else self.backbone
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                with gathered(list(module.parameters())):
                    weight = module.base_layer.weight
                    delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                    yield f"{name}.weight", _kept(weight + delta.to(weight.dtype), like=weight)
                    if module.base_layer.bias is not None:
                        yield f"{name}.bias", _kept(module.base_layer.bias, like=weight)
        for key, value in base.state_dict(keep_vars=True).items():
            if "lora_" in key or ".base_layer." in key:
                continue
            with gathered([value]):
                yield key, _kept(value, like=value)

    def merge_and_save(self, directory: str | os.PathLike, *, write: bool = True) -> Path:
        """A plain merged checkpoint that loads with from_pretrained and embeds identically.

        Collective under ZeRO-3 (every rank gathers, only the one with `write` keeps and writes).
        """
        base = self.backbone.get_base_model() if self.has_adapter else self.backbone
        state = {key: value.contiguous() for key, value in self._merged_tensors() if write}
        with gathered(self.temperature.parameters()):
            if write:
                with atomic_dir(directory, record=self.record, kind=self.kind) as tmp, quiet_transformers():
                    base.save_pretrained(tmp, state_dict=state)
                    self._write_common(tmp, merged=True)
        return Path(directory)

    # ----- optimisation -------------------------------------------------------------------
    def parameter_groups(self, weight_decay: float, temperature_lr: float | None = None) -> list[dict]:
        """Optimizer groups: decay on LoRA matrices; none on biases and norms; the temperature
        in a group of its own, without decay, at `temperature_lr` (None: the optimizer's rate)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad and not name.startswith("temperature."):
                (decay if param.ndim >= 2 else no_decay).append(param)
        temperature = {"params": [p for p in self.temperature.parameters() if p.requires_grad], "weight_decay": 0.0}
        if temperature_lr is not None:
            temperature["lr"] = temperature_lr
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            temperature,
        ]


def _with_prompt_name(kwargs: dict, name: str) -> dict:
    """`kwargs` choosing the named prompt `name` unless they give a prompt of their own."""
    if kwargs.get("prompt") is None and kwargs.get("prompt_name") is None:
        return {**kwargs, "prompt_name": name}
    return kwargs


def _kept(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` detached; a CPU copy when `like` is a ZeRO-3 parameter, whose gathered
    storage is freed when its gather ends."""
    return tensor.detach().to("cpu", copy=True) if hasattr(like, "ds_id") else tensor.detach()


def load_for_inference(path: str | os.PathLike, given: GivenSettings | None = None) -> "Embedder":
    """The embedder of `path` for encoding, with the settings `given` for a command (the CLI's
    one entry to the model)."""
    return Embedder.from_pretrained(path, given=given)

