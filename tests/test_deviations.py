"""Paper-faithful defaults of the shipped configs, and the deviations a run states (issue 26).

Every config under configs/umarvel/ (stage files, Table 5 variants, each progressive
sub-stage, and any added later) trains without false-negative masking, as the paper and the
official code do; configs/tiny keep it on, a deviation its base.yaml explains. The deviations
a run states are read from its configs (umarvel.deviations), and README's table names each
switch.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from umarvel.config import load_config, read_raw
from umarvel.demo import deviation_notes
from umarvel.deviations import DEVIATIONS, active
from umarvel.training.stages import stage_configs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _resolved(path: Path) -> dict:
    """name -> Config: the file itself, or each of its progressive sub-stages."""
    if read_raw(str(path), []).get("stages"):
        return {f"{path.name}:{name}": config for name, config in stage_configs(str(path), []).items()}
    return {path.name: load_config(path)}


# configs/umarvel and every other family's recipe, which inherits it (their backbone.yaml is a fragment).
PAPER_CONFIGS = sorted(p for d in CONFIGS.iterdir() if d.is_dir() and d.name not in ("tiny", "deepspeed")
                       for p in d.rglob("*.yaml") if p.name != "backbone.yaml")


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_umarvel_configs_do_not_mask_false_negatives(path):
    for name, config in _resolved(path).items():
        assert config.train.loss.mask_false_negatives is False, name


def test_tiny_configs_keep_masking_on():
    for path in sorted((CONFIGS / "tiny").glob("*.yaml")):
        for name, config in _resolved(path).items():
            assert config.train.loss.mask_false_negatives is True, name


MASK_LINE = "in-batch false negatives masked by document id: train.loss.mask_false_negatives=true"


def test_active_reads_the_setting_and_where_it_matters():
    on, off = load_config(None), load_config(None, ["train.loss.mask_false_negatives=false"])
    assert on.train.loss.mask_false_negatives is True
    lines = active({"a.yaml": (on, ("contrastive",)), "b.yaml": (off, ("contrastive",)),
                    "c.yaml": (on, ("mine",))})  # c does not train contrastively: the key is not read there
    assert lines == [f"{MASK_LINE} (in a.yaml)"]
    uniform = load_config(None, ["distill.sample=uniform", "train.loss.mask_false_negatives=false"])
    assert active({"d.yaml": (uniform, ("distill",))}) == [
        "distillation's sample drawn over all queries, not per task: distill.sample=uniform (in d.yaml)",
        "distillation samples distinct qids, not rows of the upsampled union file: always (no switch) (in d.yaml)"]


def test_release_profile_rules_are_no_deviation_from_the_official_inference():
    release = load_config(None, ["model.profile=umarvel-release"])
    assert active({"e.yaml": (release, ("embed",))}) == []
    one_rule = load_config(None, ["model.profile=umarvel-release", "model.rules.positions=mrope"])
    assert active({"e.yaml": (one_rule, ("embed",))}) == [
        "embedding rules other than the official inference's (prompt, positions, attention, truncation): "
        "model.profile=umarvel-release (positions=mrope) (in e.yaml)"]


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    shutil.copytree(CONFIGS / "tiny", tmp_path / "tiny")
    return tmp_path / "tiny"


def test_demo_report_states_the_deviations_of_its_configs(tiny_copy):
    notes = deviation_notes(tiny_copy)
    assert notes[:3] == ["", "## Deviations from the paper and the official code", ""]
    assert (f"- {MASK_LINE} (in progressive.yaml (nli), progressive.yaml (cc3m), progressive.yaml (mbeir), "
            "hardneg.yaml)") in notes
    assert not any("distill.sample" in line for line in notes)

    base = tiny_copy / "base.yaml"
    base.write_text(base.read_text().replace("mask_false_negatives: true", "mask_false_negatives: false"))
    distill = tiny_copy / "distill.yaml"
    distill.write_text(distill.read_text().replace("distill:\n", "distill:\n  sample: uniform\n", 1))
    notes = deviation_notes(tiny_copy)
    assert not any(MASK_LINE in line for line in notes)
    assert ("- distillation's sample drawn over all queries, not per task: distill.sample=uniform (in distill.yaml)"
            in notes)


def test_readme_table_names_every_switch():
    readme = (CONFIGS.parent / "README.md").read_text()
    start = readme.index("## Deviations from the paper and the official code")
    table = readme[start:readme.index("\n## ", start + 1)]
    for deviation in DEVIATIONS:
        if deviation.switch:
            assert f"`{deviation.switch}" in table, deviation.switch
