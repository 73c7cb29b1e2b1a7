"""Embedding profiles: the named rule sets that decide how an item becomes a vector.

A checkpoint embeds well only under the rules it was trained with, so the rules travel with a
name. `umarvel` is this framework's own recipe. `umarvel-release` reproduces the official
U-MARVEL inference of the released checkpoints (chaxjli/U-MARVEL, transformers 4.45): its
prompt with <emb> and instruction-marker tokens, its pooling span, 1-D positions, attention
that is bidirectional only in padded batches, candidates cut to 1024 tokens, its text
normalisation, its image reading and its batches (16 in file order, on which that attention rule
depends). Every rule can be overridden on its own (`model.rules.*`) to measure what each one costs.

A profile belongs to backbone families: the release profile exists for the families its
checkpoints were trained on, with the rules each family's official inference follows (the
Qwen3-VL release differs from the Qwen2-VL one: its marker rows at the embeddings' mean (its
transformers 4.57 resizes with mean_resizing), no system turn, bidirectional in every batch,
DeepStack features left out, images resized at Qwen2-VL's 28 px before the processor, which then
resizes them within its own saved pixel bounds, 65536-16777216 for Qwen3-VL-4B-Instruct).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from umarvel.config import ConfigError, ModelConfig

# The tokens the official inference adds to the base tokenizer at load, in this order.
EMB_TOKEN = "<emb>"
INSTRUCTION_START = "<instruction_start>"
INSTRUCTION_END = "<instruction_end>"
RELEASE_TOKENS = (EMB_TOKEN, INSTRUCTION_START, INSTRUCTION_END)
# Its system turn: the base chat template's default.
RELEASE_SYSTEM_PROMPT = "You are a helpful assistant."
# Its evaluation batches: 16 items in file order (DataLoader(batch_size=16, shuffle=False) in
# eval/eval_mbeir_local_finetune_fast.py, for the queries and for each pool).
RELEASE_BATCH = 16
# A marker_rows spec: the rows at the mean of the rows before them (transformers >= 4.46's resize).
MEAN_MARKERS = "mean"


@dataclass(frozen=True)
class Rules:
    """The resolved rules one embedder follows (fields as in config.ProfileRulesConfig)."""

    template: str
    release_quirks: bool
    marker_rows: str
    positions: str
    unpadded_causal: bool
    truncation: str
    candidate_max_tokens: int
    system_turn: bool
    deepstack: bool
    image_resize: str
    batching: str
    text_format: str
    images: str
    processor_pixels: str

    @property
    def release_template(self) -> bool:
        return self.template == "release"

    @property
    def fixed_batch(self) -> int | None:
        """N of batching 'file:N' (batches of N in file order), None for length-sorted batches."""
        return batch_plan(self.batching)


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    families: tuple[str, ...] | None  # backbone families it applies to; None = all
    rules: Rules
    # config.json architectures of the released checkpoints this profile reads as they are
    architectures: tuple[str, ...] = ()
    # family -> its own rules, where its release's official inference differs from `rules`
    variants: dict[str, Rules] = field(default_factory=dict)
    # family -> the architecture its released checkpoints name (`make-tiny-model --layout`)
    layout_architectures: dict[str, str] = field(default_factory=dict)

    def rules_for(self, family: str | None) -> Rules:
        return self.variants.get(family, self.rules)


UMARVEL = Profile(
    name="umarvel",
    summary="umarvel's recipe: its prompt, instruction tokens left out of the pool by character span, M-RoPE, "
            "model.attention in every batch, text cut to prompt.max_text_tokens.",
    families=None,
    rules=Rules(template="umarvel", release_quirks=False, marker_rows="seed:0", positions="mrope",
                unpadded_causal=False, truncation="text", candidate_max_tokens=1024, system_turn=True,
                deepstack=True, image_resize="family", batching="length", text_format="umarvel", images="umarvel",
                processor_pixels="prompt"),
)
_RELEASE_RULES = Rules(template="release", release_quirks=True, marker_rows="seed:0", positions="1d",
                       unpadded_causal=True, truncation="candidates", candidate_max_tokens=1024, system_turn=True,
                       deepstack=True, image_resize="family", batching=f"file:{RELEASE_BATCH}",
                       text_format="release", images="release", processor_pixels="prompt")
UMARVEL_RELEASE = Profile(
    name="umarvel-release",
    summary="the official inference of TencentBAC/U-MARVEL-Qwen2VL-7B-Instruct: system turn, user turn "
            "[image]<instruction_start>{instruction}<instruction_end> {text} + 'Summarize above ... in one word: ', "
            "assistant turn '<emb>.', generation prompt; mean over every non-pad token but the marker span; 1-D "
            "positions; bidirectional only in padded batches; candidates cut to 1024 tokens, queries never; texts "
            "normalised by its format_string; images read by its copy of qwen-vl-utils; batches of 16 in file order. "
            "For qwen3-vl, U-MARVEL-Qwen3VL-4B-Instruct's: the same with marker rows at the embeddings' mean, "
            "without the system turn, bidirectional in every batch, no DeepStack features, images resized at 28 px "
            "(Qwen2-VL's qwen-vl-utils) before the processor's own resize within its saved pixel bounds.",
    families=("qwen2-vl", "qwen3-vl"),
    rules=_RELEASE_RULES,
    architectures=("Qwen2VLRetFinetuneForConditionalGeneration", "Qwen2VLRetForConditionalGeneration",
                   "Qwen3VLRetFinetuneForConditionalGeneration"),
    variants={"qwen3-vl": dataclasses.replace(_RELEASE_RULES, system_turn=False, unpadded_causal=False,
                                              deepstack=False, image_resize="qwen2-vl",
                                              processor_pixels="checkpoint", marker_rows=MEAN_MARKERS)},
    layout_architectures={"qwen2-vl": "Qwen2VLRetFinetuneForConditionalGeneration",
                          "qwen3-vl": "Qwen3VLRetFinetuneForConditionalGeneration"},
)
PROFILES = {profile.name: profile for profile in (UMARVEL, UMARVEL_RELEASE)}
DEFAULT = UMARVEL.name
# Checkpoint layouts `umarvel make-tiny-model --layout` writes: umarvel's, and each release's.
LAYOUTS = (UMARVEL.name, *(profile.name for profile in PROFILES.values() if profile.architectures))


def get(name: str, family: str | None = None) -> Profile:
    """The profile `name`; an error naming model.profile when unknown or not made for `family`."""
    if name not in PROFILES:
        raise ConfigError(f"model.profile: unknown embedding profile {name!r}; umarvel has {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if family is not None and profile.families is not None and family not in profile.families:
        families = f"{', '.join(profile.families)} famil{'ies' if len(profile.families) > 1 else 'y'}"
        raise ConfigError(f"model.profile: {name!r} is a profile of the {families}, the backbone is {family}")
    return profile


def resolve(config: ModelConfig, family: str | None = None) -> Rules:
    """The profile's rules with the config's `model.rules` overrides on top."""
    rules = get(config.profile, family).rules_for(family)
    overrides = {k: v for k, v in dataclasses.asdict(config.rules).items() if v is not None}
    if overrides.get("candidate_max_tokens", 1) < 1:
        raise ConfigError("model.rules.candidate_max_tokens must be positive")
    resolved = dataclasses.replace(rules, **overrides)
    marker_source(resolved.marker_rows)
    batch_plan(resolved.batching)
    return resolved


def batch_plan(spec: str) -> int | None:
    """N of a 'file:N' batching spec, None for 'length'; an error naming the key otherwise."""
    if spec == "length":
        return None
    size = spec.removeprefix("file:")
    if spec.startswith("file:") and size.isdigit() and int(size) >= 1:
        return int(size)
    raise ConfigError(f"model.rules.batching: {spec!r} is neither 'length' nor 'file:N' with N >= 1")


def marker_source(spec: str) -> int | Path | str:
    """The seed of a 'seed:N' marker_rows spec, MEAN_MARKERS, or the file it names; checked
    whatever the template, so that a mistyped path is an error at load, not a setting that
    silently measures nothing (release.prepare_backbone reads what this returns)."""
    if spec == MEAN_MARKERS:
        return spec
    if spec.startswith("seed:"):
        try:
            return int(spec.removeprefix("seed:"))
        except ValueError:
            raise ConfigError(f"model.rules.marker_rows: {spec!r} is not 'seed:N' with an integer N") from None
    if not Path(spec).is_file():
        raise ConfigError(f"model.rules.marker_rows: {spec} is neither 'seed:N' nor an existing file, nor 'mean'")
    return Path(spec)


def released_profile(architectures: list[str] | None) -> Profile | None:
    """The profile whose released checkpoints carry one of these config.json architectures."""
    for profile in PROFILES.values():
        if set(profile.architectures) & set(architectures or ()):
            return profile
    return None
