"""A tiny MMEB tree in the published layout (umarvel/evaluation/mmeb_layout.py): MMEB-eval/README.md
with its YAML header, one parquet per subset, PIL-drawn images under eval_images/.

Four subsets, one per category: ImageNet-1K (V1, classification), OK-VQA (V1, VQA), MSCOCO_t2i
(V1, retrieval) and RefCOCO (V2 columns, visual grounding, OOD). The README also lists
CIFAR-100, which is not one of the 36 and has no files: a default run leaves it out.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COLOURS = ["red", "green", "blue"]
SUBSETS = ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "RefCOCO")
V1_TYPES = {"qry_text": pa.string(), "qry_img_path": pa.string(), "tgt_text": pa.list_(pa.string()),
            "tgt_img_path": pa.list_(pa.string())}
V2_TYPES = {"qry_inst": pa.string(), **V1_TYPES, "tgt_inst": pa.string()}


def image(root: Path, relative: str, colour: str) -> str:
    path = root / "eval_images" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return relative


def readme(configs: list[str], extra: str = "") -> str:
    body = "".join(f"  - config_name: {name}\n    data_files:\n      - split: test\n        path: {name}/test-*\n"
                   for name in configs)
    return f"---\nlicense: apache-2.0\n{extra}configs:\n{body}---\n\n# MMEB-eval (fixture)\n"


def write_parquet(path: Path, columns: dict, types: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    types = types or (V2_TYPES if "qry_inst" in columns else V1_TYPES)
    pq.write_table(pa.table({name: pa.array(values, type=types.get(name, pa.string()))
                             for name, values in columns.items()}), path)
    return path


def rows() -> dict[str, dict]:
    """Column values per subset (images are written by `write_mmeb`)."""
    rotate = lambda i: COLOURS[i:] + COLOURS[:i]  # noqa: E731 - the positive first
    return {
        "ImageNet-1K": {
            "qry_text": ["<|image_1|>\nRepresent the given image for classification"] * 3,
            "qry_img_path": [f"ImageNet-1K/{c}.png" for c in COLOURS],
            "tgt_text": [rotate(i) for i in range(3)],
            "tgt_img_path": [["", "", ""]] * 3,
        },
        "OK-VQA": {
            "qry_text": [f"<|image_1|>\nRepresent the given image with the following question: What colour is {i}?"
                         for i in range(3)],
            "qry_img_path": [f"OK-VQA/{c}.png" for c in COLOURS],
            "tgt_text": [[c, "a colour: none"] for c in COLOURS],
            "tgt_img_path": [["", ""]] * 3,
        },
        "MSCOCO_t2i": {
            "qry_text": [f"Find me an everyday image that matches the given caption: a {c} square" for c in COLOURS],
            "qry_img_path": [""] * 3,
            "tgt_text": [["<|image_1|>\nRepresent the given image."] * 3] * 3,
            "tgt_img_path": [[f"MSCOCO_t2i/{c}.png" for c in rotate(i)] for i in range(3)],
        },
        "RefCOCO": {
            "qry_inst": ["<|image_1|> Select the portion of the image that follows the language expressions:"] * 2,
            "qry_text": ["the red one", "the blue one"],
            "qry_img_path": ["RefCOCO/scene.png"] * 2,
            "tgt_inst": ["<|image_1|> Represent the given cropped image of the object"] * 2,
            "tgt_text": [["", ""], ["", ""]],
            "tgt_img_path": [["RefCOCO/red.png", "RefCOCO/blue.png"], ["RefCOCO/blue.png", "RefCOCO/red.png"]],
        },
    }


def write_mmeb(root: Path, subsets=SUBSETS) -> Path:
    """The fixture tree under `root` (returned): MMEB-eval/ and eval_images/."""
    for colour in COLOURS:
        for folder in ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "RefCOCO"):
            image(root, f"{folder}/{colour}.png", colour)
    image(root, "RefCOCO/scene.png", "white")
    data = rows()
    for name in subsets:
        write_parquet(root / "MMEB-eval" / name / "test-00000-of-00001.parquet", data[name])
    (root / "MMEB-eval" / "README.md").write_text(readme([*subsets, "CIFAR-100"]))
    return root
