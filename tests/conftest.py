"""Shared fixtures: tiny checkpoints of every backbone family built once per session, no network."""
from __future__ import annotations

import os

import pytest
from PIL import Image, ImageDraw

from umarvel import backbones
from umarvel.tiny import build_tiny_model

# Most pytest-xdist workers `-n auto` starts: each holds its own tiny models and a test that
# launches 2 ranks runs 3 processes of ~2 GB, so more would need more than a 24 GiB machine.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per core this process may use, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_WORKERS)


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first (stably), so that under `--dist loadscope` the long ones
    start at once and the quick ones fill the end of the run on every worker."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep every test's parsed tables, embeddings and file hashes out of the user's
    ~/.cache/umarvel (a test that needs its own cache still sets UMARVEL_CACHE itself)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("UMARVEL_CACHE", str(tmp_path_factory.mktemp("umarvel-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2vl", seed=0)


@pytest.fixture(scope="session")
def family_model_dirs(tiny_model_dir, tmp_path_factory):
    """A tiny checkpoint of every supported family by name (the default one is `tiny_model_dir`),
    for a test that runs them all in one launch."""
    return {name: tiny_model_dir if name == backbones.DEFAULT else
            build_tiny_model(tmp_path_factory.mktemp("tiny-family") / name, seed=0, family=name)
            for name in backbones.names()}


@pytest.fixture(scope="session", params=backbones.names())
def family_model_dir(request):
    """A tiny checkpoint of each supported family in turn."""
    return request.getfixturevalue("family_model_dirs")[request.param]


def draw_image(colour: str, shape: str = "circle", size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return image


@pytest.fixture(scope="session")
def mixed_items():
    """Text, image and image+text items of different lengths, some with instructions."""
    return [
        {"text": "two red circles on the left of a green square", "instruction": "Find an image that matches the caption."},
        {"image": draw_image("red")},
        {"image": draw_image("blue", "square"), "text": "same but red", "instruction": "Retrieve the modified image."},
        {"text": "a cat"},
        {"image": draw_image("green"), "text": "what colour is the circle in this picture?"},
    ]


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """The tiny synthetic benchmark: M-BEIR/, nli_for_simcse.csv, cc3m/."""
    from umarvel.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    write_synthetic(out, seed=0, size="tiny")
    return out


@pytest.fixture()
def tiny_workdir(tmp_path, monkeypatch, tiny_model_dir, synthetic_dir):
    """A working directory laid out as the tiny configs expect (checkpoints/, data/synthetic)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tiny-qwen2vl").symlink_to(tiny_model_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(synthetic_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path
