"""The README starts with install + demo and the tests; CI runs exactly its install and test commands;
its Python example runs and does what its comments say."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    install, demo = blocks[0].strip().splitlines()[:2]
    test = blocks[1].strip()
    assert demo.startswith("umarvel demo")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [install, test]


def test_the_python_api_example_runs_and_saves_what_it_says(tiny_workdir):
    from conftest import draw_image
    from umarvel import Embedder

    Embedder.from_pretrained("checkpoints/tiny-qwen2vl", trainable=True).save_pretrained("runs/tiny/distill/model")
    draw_image("red").save("photo.jpg")
    (example,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    scope: dict = {}
    exec(example, scope)
    assert tuple(scope["vectors"].shape) == (3, 64)
    assert tuple(scope["scores"].shape) == (1, 2)  # one query against an image and a text
    assert (tiny_workdir / "runs/my-adapter/adapter_model.safetensors").is_file()
    for whole in ("runs/my-merged", "runs/my-copy"):  # the plain backbone is saved whole, not as an adapter
        assert (tiny_workdir / whole / "model.safetensors").is_file()
        assert not (tiny_workdir / whole / "adapter_model.safetensors").exists()
