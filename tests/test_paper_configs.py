"""Every shipped paper config (configs/umarvel/**.yaml) runs as a GPU user runs it: the DeepSpeed
launcher with 2 ranks and the config's own ZeRO JSON (stage 1a, stage 2 and the reranker once more
with configs/deepspeed/zero3.json), the tiny Qwen2-VL laid out at the backbone path the configs name and the synthetic benchmark at their data paths.

Overridden, only what a CPU or a tiny random model cannot do:
  model.attn_implementation=sdpa (no flash-attention on CPU), train.max_steps=2 (run length);
  data.negative_top_up=true for stage 2: an untrained tiny model scores every candidate above
  mine.yaml's 0.9 filter, so no query keeps 5 negatives; for the other families' chains only,
  the contrastive stages' per-device batch (4: the paper's sizes run once, in configs/umarvel's).
Each training stage must leave DONE, a complete model, and TensorBoard scalars from the
default `report_to: [tensorboard]`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspeed_steps_worker import Step, launch
from test_telemetry import SCALARS, tensorboard_scalars
from umarvel import backbones
from umarvel.config import load_config, to_dict
from umarvel.data.synthetic import write_synthetic
from umarvel.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--set", "model.attn_implementation=sdpa"]
SHORT = [*CPU, "--set", "train.max_steps=2"]
ZERO3 = ["--set", "train.deepspeed=configs/deepspeed/zero3.json"]


def chain(folder: str, batch: int | None = None) -> list[tuple[str, list[str], list[str]]]:
    """The paper recipe of configs/<folder>/ in dependency order: (name, umarvel arguments, run
    directories under runs/<folder>/ it must finish). `batch`: the contrastive stages' per-device
    batch instead of the config's."""
    configs, runs = f"configs/{folder}", f"runs/{folder}"
    mine = ["--model", f"{runs}/progressive/mbeir", "--data", "data/M-BEIR"]
    sized = [] if batch is None else [f"stages.{stage}.train.per_device_batch_size={batch}" for stage in ("nli", "cc3m", "mbeir")]
    progressive_batch = [word for setting in sized for word in ("--set", setting)]
    hardneg_batch = [] if batch is None else ["--set", f"train.per_device_batch_size={batch}"]
    return [
        ("progressive", ["train", "--stage", "progressive", "--config", f"{configs}/progressive.yaml", *SHORT,
                         *progressive_batch], ["progressive/nli", "progressive/cc3m", "progressive/mbeir"]),
        ("mine", ["mine-negatives", *mine, "--out", f"{runs}/hardneg.jsonl", "--config", f"{configs}/mine.yaml", *CPU], []),
        ("hardneg", ["train", "--stage", "hardneg", "--config", f"{configs}/hardneg.yaml", *SHORT, *hardneg_batch,
                     "--set", "data.negative_top_up=true"], ["hardneg"]),
        ("reranker", ["train", "--stage", "reranker", "--config", f"{configs}/reranker.yaml", *SHORT], ["reranker"]),
        ("distill", ["distill", "--config", f"{configs}/distill.yaml", *SHORT], ["distill"]),
        ("eval", ["eval", "mbeir", "--pool", "both", "--model", f"{runs}/distill", "--data", "data/M-BEIR",
                  "--output-dir", f"{runs}/eval", "--config", f"{configs}/base.yaml", *CPU], []),
        # U-MARVEL+ (paper Appendix C): a reranker on the distilled model's top 100, re-scoring its rankings
        ("plus-reranker", ["train", "--stage", "reranker", "--config", f"{configs}/plus-reranker.yaml", *SHORT],
         ["plus-reranker"]),
        ("plus-eval", ["eval", "mbeir", "--pool", "local", "--model", f"{runs}/distill", "--data", "data/M-BEIR",
                       "--output-dir", f"{runs}/eval-plus", "--rerank", f"{runs}/plus-reranker", "--rerank-top-k", "50",
                       "--alpha", "auto", "--config", f"{configs}/base.yaml", *CPU], []),
    ]


MINE = ["--model", "runs/umarvel/progressive/mbeir", "--data", "data/M-BEIR"]
TABLE5 = [
    ("table5-mine", ["mine-negatives", *MINE, "--out", "runs/umarvel/hardneg-unfiltered.jsonl",
                     "--config", "configs/umarvel/table5/mine-unfiltered.yaml", *CPU], []),
    ("table5-id0", ["train", "--stage", "hardneg", "--config", "configs/umarvel/table5/id0-topk-only.yaml", *SHORT],
     ["table5/id0-topk-only"]),
    ("table5-id1", ["train", "--stage", "hardneg", "--config", "configs/umarvel/table5/id1-inbatch-topk.yaml", *SHORT],
     ["table5/id1-inbatch-topk"]),
]
ZERO3_STEPS = [
    # the same configs under configs/deepspeed/zero3.json (GradCache included: the paper configs set chunks of 16)
    ("zero3-nli", ["train", "--stage", "nli", "--config", "configs/umarvel/progressive.yaml", *SHORT, *ZERO3,
                   "--set", "run.output_dir=runs/umarvel/zero3/progressive"], ["zero3/progressive/nli"]),
    ("zero3-hardneg", ["train", "--stage", "hardneg", "--config", "configs/umarvel/hardneg.yaml", *SHORT, *ZERO3,
                       "--set", "data.negative_top_up=true", "--set", "run.output_dir=runs/umarvel/zero3/hardneg"],
     ["zero3/hardneg"]),
    ("zero3-reranker", ["train", "--stage", "reranker", "--config", "configs/umarvel/reranker.yaml", *SHORT, *ZERO3,
                        "--set", "run.output_dir=runs/umarvel/zero3/reranker"], ["zero3/reranker"]),
]
STEPS = chain("umarvel") + TABLE5 + ZERO3_STEPS
# One launch runs several steps (deepspeed_steps_worker.py), as a launch costs more than a
# 2-step run: the chain with Table 5's runs, then the ZeRO-3 runs (a ZeRO-3 TrainingArguments
# changes how later models load in its process, so they do not share one with ZeRO-2 runs).
LAUNCHES = [chain("umarvel") + TABLE5, ZERO3_STEPS]
# Other families: the whole chain of every family folder, each on a tiny model of its family laid
# out at the checkpoint path it names (test_family_configs_change_only_backbone_pixels_and_paths
# checks, besides, that they differ from configs/umarvel only in backbone, pixel limits and paths).
# The paper's batch sizes (GradCache chunking them included) run once, in configs/umarvel's chain:
# a family's chain trains with 4 per device, what the backbone needs to go through every step.
# All the families' chains run in one launch (steps named <folder>-<step>).
FAMILY_FOLDERS = {
    "qwen2_5vl-7b": ("qwen2.5-vl", "Qwen2.5-VL-7B-Instruct"),
    "qwen3vl-4b": ("qwen3-vl", "Qwen3-VL-4B-Instruct"),
    "qwen3vl-8b": ("qwen3-vl", "Qwen3-VL-8B-Instruct"),
}
FAMILY_BATCH = 4
FAMILY_STEPS = [(folder, *step) for folder in FAMILY_FOLDERS for step in chain(folder, FAMILY_BATCH)]
FAMILY_LAUNCH = [(f"{folder}-{name}", arguments, run_dirs) for folder, name, arguments, run_dirs in FAMILY_STEPS]


@pytest.fixture(scope="module")
def paper_layout(tmp_path_factory):
    """A working directory with the paths the paper configs name."""
    workdir = tmp_path_factory.mktemp("paper")
    build_tiny_model(workdir / "checkpoints" / "Qwen2-VL-7B-Instruct", seed=0)
    for family, checkpoint in FAMILY_FOLDERS.values():
        build_tiny_model(workdir / "checkpoints" / checkpoint, seed=0, family=family)
    write_synthetic(workdir / "data", seed=0, size="tiny")
    (workdir / "configs").symlink_to(ROOT / "configs")
    return workdir


def _run_in_order(workdir: Path, launches) -> dict[str, Step]:
    """Run every step once; a failing step fails every test that needs it, with its log."""
    outcome = {}
    for steps in launches:
        ran = launch(workdir, [(name, arguments) for name, arguments, _ in steps])
        outcome.update(ran)
        if len(ran) < len(steps) or any(step.returncode for step in ran.values()):
            break
    return outcome


@pytest.fixture(scope="module")
def paper_runs(paper_layout):
    return paper_layout, _run_in_order(paper_layout, LAUNCHES)


@pytest.fixture(scope="module")
def family_runs(paper_layout):
    return paper_layout, _run_in_order(paper_layout, [FAMILY_LAUNCH])


def _scalars_of(run_dir: str) -> list[str]:
    """The reranker has no temperature; only InfoNCE stages report in-batch accuracy."""
    name = run_dir.split("/")[-1]
    skip = {"reranker": ("train/temperature", "train/accuracy"), "distill": ("train/accuracy",)}.get(
        "reranker" if name.endswith("reranker") else name, ())
    return [tag for tag in SCALARS if tag not in skip]


@pytest.mark.slow
@pytest.mark.parametrize("name, arguments, run_dirs", STEPS, ids=[step[0] for step in STEPS])
def test_paper_config_runs_under_deepspeed(paper_runs, name, arguments, run_dirs):
    workdir, outcome = paper_runs
    _check_step(workdir / "runs" / "umarvel", outcome, name, run_dirs)


@pytest.mark.slow
@pytest.mark.parametrize("folder, name, arguments, run_dirs", FAMILY_STEPS,
                         ids=[f"{step[0]}-{step[1]}" for step in FAMILY_STEPS])
def test_family_config_runs_under_deepspeed(family_runs, folder, name, arguments, run_dirs):
    workdir, outcome = family_runs
    _check_step(workdir / "runs" / folder, outcome, f"{folder}-{name}", run_dirs)
    if name == "progressive":
        saved = json.loads((workdir / "runs" / folder / "progressive/mbeir/merged/config.json").read_text())
        assert saved["model_type"] == backbones.get(FAMILY_FOLDERS[folder][0]).model_type


def _check_step(runs: Path, outcome: dict, name: str, run_dirs: list[str]) -> None:
    assert name in outcome, "an earlier step failed"
    done = outcome[name]
    assert done.returncode == 0, done.output[-6000:]
    for run_dir in run_dirs:
        run = runs / run_dir
        assert (run / "DONE").is_file()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 2
        model = "model/reranker_config.json" if run_dir.endswith("reranker") else "merged/model.safetensors"
        assert (run / model).is_file()
        scalars = tensorboard_scalars(run)
        for tag in _scalars_of(run_dir):
            assert len(scalars.get(tag, [])) == 2, f"{run_dir}: {tag} not in TensorBoard ({sorted(scalars)})"
        assert "step 2/2 (100%)" in done.output


@pytest.mark.slow
def test_stage_two_trains_with_its_top_k_and_table5_top_k_only_uses_own_negatives(paper_runs):
    workdir, _ = paper_runs
    hardneg = json.loads((workdir / "runs/umarvel/hardneg/metrics.json").read_text())["negatives"]
    assert hardneg["selection"] == "top" and hardneg["num_negatives"] == 5
    header = json.loads((workdir / "runs/umarvel/hardneg.jsonl").read_text().splitlines()[0])
    assert header["params"]["top_k"] == 5
    unfiltered = json.loads((workdir / "runs/umarvel/hardneg-unfiltered.jsonl").read_text().splitlines()[0])
    assert unfiltered["params"]["threshold"] == 1.0
    id0 = (workdir / "runs/umarvel/table5/id0-topk-only/config.yaml").read_text()
    assert "in_batch_negatives: false" in id0


@pytest.mark.slow
def test_plus_reranker_trains_on_the_distilled_models_top_100_and_reranks_its_rankings(paper_runs):
    workdir, _ = paper_runs
    header = json.loads((workdir / "runs/umarvel/plus-reranker/pairs.jsonl").read_text().splitlines()[0])
    assert header["params"]["recall_model"] == "runs/umarvel/distill" and header["params"]["top_n"] == 100
    teacher = json.loads((workdir / "runs/umarvel/reranker/pairs.jsonl").read_text().splitlines()[0])
    assert teacher["params"]["recall_model"] == "runs/umarvel/hardneg" and teacher["params"]["top_n"] == 50
    rerank = json.loads((workdir / "runs/umarvel/eval-plus/local/results.json").read_text())["rerank"]
    assert rerank["chosen_on"] == "val" and rerank["top_k"] == 50
    assert rerank["model"].endswith("runs/umarvel/plus-reranker/model")


CHANGED = {"model.backbone", "model.prompt.min_pixels", "model.prompt.max_pixels", "run.output_dir",
           "data.hard_negatives", "rerank.recall_model", "distill.reranker"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("folder", ["qwen2_5vl-7b", "qwen3vl-4b", "qwen3vl-8b"])
def test_family_configs_change_only_backbone_pixels_and_paths(folder):
    """Each family folder is the configs/umarvel recipe with its backbone, its pixel unit and its runs."""
    checkpoint = load_config(ROOT / "configs" / folder / "base.yaml").model.backbone
    family = {"qwen2_5vl-7b": "qwen2.5-vl", "qwen3vl-4b": "qwen3-vl", "qwen3vl-8b": "qwen3-vl"}[folder]
    unit = backbones.get(family).pixel_unit
    for stage in ("base", "progressive", "mine", "hardneg", "reranker", "distill", "plus-reranker"):
        ours = _flat(to_dict(load_config(ROOT / "configs" / folder / f"{stage}.yaml")))
        paper = _flat(to_dict(load_config(ROOT / "configs" / "umarvel" / f"{stage}.yaml")))
        differing = {key for key in ours if ours[key] != paper[key]}
        assert differing <= CHANGED, (stage, differing - CHANGED)
        assert ours["model.prompt.min_pixels"] == 4 * unit * unit and ours["model.prompt.max_pixels"] == 300 * unit * unit
        for key in differing & (CHANGED - {"model.prompt.min_pixels", "model.prompt.max_pixels"}):
            value = ours[key]
            assert value == checkpoint or value.startswith(f"runs/{folder}/"), (stage, key, value)


@pytest.mark.parametrize("folder", ["umarvel", "qwen2_5vl-7b", "qwen3vl-4b", "qwen3vl-8b", "tiny"])
def test_plus_reranker_config_trains_on_the_final_models_top_candidates(folder):
    """U-MARVEL+ (paper Appendix C): the reranker's pairs come from the distilled (final) model's
    top 100 (tiny: top 20, twice the stage-2 reranker's 10 as 100 is twice 50), not from the stage-2
    model the distillation teacher reads; its header evaluates the distilled model with it."""
    configs = ROOT / "configs" / folder
    plus, teacher = load_config(configs / "plus-reranker.yaml"), load_config(configs / "reranker.yaml")
    distill, hardneg = load_config(configs / "distill.yaml"), load_config(configs / "hardneg.yaml")
    assert plus.rerank.recall_model == distill.run.output_dir == f"runs/{folder}/distill"
    assert plus.rerank.top_n == (20 if folder == "tiny" else 100) == 2 * teacher.rerank.top_n
    assert teacher.rerank.recall_model == hardneg.run.output_dir and distill.distill.reranker == teacher.run.output_dir
    assert plus.run.output_dir == f"runs/{folder}/plus-reranker" != teacher.run.output_dir
    if folder in ("umarvel", "tiny"):
        header = (configs / "plus-reranker.yaml").read_text()
        assert f"--model runs/{folder}/distill " in header and f"--rerank runs/{folder}/plus-reranker " in header
