"""Where a run departs from the paper or the official code (chaxjli/U-MARVEL), read from its configs.

Why one registry: a result is comparable with the paper's only when a reader knows what differed,
and a hand-kept list drifts from the configs it describes. README's table "Deviations from the
paper and the official code" has a row for every entry here (tests/test_deviations.py checks each
switch is named there); a report states the ones its configs ran with (`active`), so the demo's
report says, for instance, that configs/tiny mask in-batch false negatives and configs/umarvel do not.

A deviation matters only where its key is read: `uses` names those places ("contrastive"
training, "mine", "distill", "embed" for anything that encodes, "mbeir" and "zeroshot"
evaluation). One without a switch (`switch` empty) is always so where it applies.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from umarvel import profiles
from umarvel.config import Config


@dataclass(frozen=True)
class Deviation:
    what: str
    switch: str  # the config key that turns it on or off; empty = none
    uses: tuple[str, ...]
    setting: Callable[[Config], str | None]  # the config's departing setting in words; None = as the paper


def _word(value) -> str:
    """A value as YAML spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _release_rules(config: Config) -> str | None:
    """The rules that differ from the official inference's (the umarvel-release profile)."""
    rules = profiles.resolve(config.model)
    official = profiles.UMARVEL_RELEASE.rules
    differing = [f"{name}={_word(getattr(rules, name))}" for name in (f.name for f in dataclasses.fields(rules))
                 if getattr(rules, name) != getattr(official, name)]
    return f"model.profile={config.model.profile} ({', '.join(differing)})" if differing else None


def _always(config: Config) -> str:
    return "always (no switch)"


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("in-batch false negatives masked by document id", "train.loss.mask_false_negatives", ("contrastive",),
              lambda c: "train.loss.mask_false_negatives=true" if c.train.loss.mask_false_negatives else None),
    Deviation("relative false-negative filter (a fraction of the query's best positive)",
              "mine.max_fraction_of_positive", ("mine",),
              lambda c: (f"mine.max_fraction_of_positive={c.mine.max_fraction_of_positive:g}"
                         if c.mine.max_fraction_of_positive > 0 else None)),
    Deviation("distillation's sample drawn over all queries, not per task", "distill.sample", ("distill",),
              lambda c: "distill.sample=uniform" if c.distill.sample == "uniform" else None),
    Deviation("distillation samples distinct qids, not rows of the upsampled union file", "", ("distill",), _always),
    Deviation("VisDial queries start with the image's caption", "eval.zeroshot.visdial_caption", ("zeroshot",),
              lambda c: "eval.zeroshot.visdial_caption=true" if c.eval.zeroshot.visdial_caption else None),
    Deviation("embedding rules other than the official inference's (prompt, positions, attention, truncation)",
              "model.profile", ("embed",), _release_rules),
    Deviation("an M-BEIR test query's instruction chosen by a hash of its qid, not at random", "", ("mbeir",), _always),
    Deviation("zero-shot COCO items end in the one-word suffix", "", ("zeroshot",), _always),
    Deviation("multi-turn FashionIQ queries put every turn's images first", "", ("zeroshot",), _always),
)


def active(configs: Mapping[str, tuple[Config, Iterable[str]]]) -> list[str]:
    """One line per deviation the configs run with: `what: setting (in name, ...)`.

    `configs` maps a config's name to (its resolved config, the uses it was run for).
    """
    lines = []
    for deviation in DEVIATIONS:
        found: dict[str, list[str]] = {}
        for name, (config, uses) in configs.items():
            setting = deviation.setting(config) if set(deviation.uses) & set(uses) else None
            if setting is not None:
                found.setdefault(setting, []).append(name)
        lines += [f"{deviation.what}: {setting} (in {', '.join(names)})" for setting, names in found.items()]
    return lines
