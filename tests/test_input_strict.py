"""Inputs that used to change numbers silently or end in a traceback: image modes, huge and
oddly shaped images, the Python API's and the MTEB adapter's inputs, ids in non-ASCII digits."""
from __future__ import annotations

import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import draw_image
from umarvel import Embedder
from umarvel.cli import main
from umarvel.data import images
from umarvel.data.arrowtable import ErrorLog
from umarvel.data.collator import Collator
from umarvel.data.mbeir import parse_candidate, parse_id, parse_qrels_line, parse_query, read_instruction_rows
from umarvel.data.validate import validate
from umarvel.errors import DataError, UmarvelError

POOL_IMAGE = "mbeir_images/nights_images/eval/nights_c000009.jpg"  # did 4:9 of the nights_task4 pool
POOL_FILE = "cand_pool/local/mbeir_nights_task4_cand_pool.jsonl"


@pytest.fixture(scope="module")
def embedder(tiny_model_dir) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir)


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A PNG whose header says width x height (the pixel data is cut short: only the header is read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path


def grey_scene() -> np.ndarray:
    image = Image.new("L", (64, 64), 40)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 20, 63), fill=120)
    draw.ellipse((24, 12, 56, 44), fill=210)
    return np.asarray(image)


# ---- any PIL mode -> the right RGB ----------------------------------------------------------

def test_a_16_bit_png_embeds_like_its_8_bit_original_not_like_white(embedder, tmp_path):
    eight = grey_scene()
    Image.fromarray(eight).save(tmp_path / "8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode == "I;16"
    sixteen, original, white = embedder.encode([tmp_path / "16.png", tmp_path / "8.png",
                                                Image.new("RGB", (64, 64), "white")], convert_to_tensor=True)
    scores = embedder.similarity(sixteen, np.stack([original.numpy(), white.numpy()]))[0]
    assert scores[0] > 0.999
    assert scores[1] < 0.95
    # a 16-bit PIL image given to the API is read the same way
    given = embedder.encode(Image.open(tmp_path / "16.png"), convert_to_tensor=True)
    assert float(embedder.similarity(given, original)[0, 0]) > 0.999


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putdata([0, 1])
    image.info["transparency"] = 1
    return image


@pytest.mark.parametrize("image, expected", [
    (Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)), [0, 100, 255]),  # I;16
    (Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32)), [0, 100, 255]),  # I
    (Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=">u2")), [0, 100, 255]),  # I;16B
    (Image.fromarray(np.array([[0.0, 100 / 255, 1.0]], dtype=np.float32)), [0, 100, 255]),  # F
    (Image.new("LA", (3, 1), (30, 0)), [255, 255, 255]),  # fully transparent: the white ground
    (Image.new("LA", (3, 1), (30, 255)), [30, 30, 30]),
    (Image.new("PA", (3, 1), (0, 0)), [255, 255, 255]),
    (Image.new("RGBA", (3, 1), (0, 0, 0, 0)), [255, 255, 255]),
    (Image.new("La", (3, 1), (0, 0)), [255, 255, 255]),
    (Image.new("RGBa", (3, 1), (50, 50, 50, 128)), [177, 177, 177]),
    (Image.new("1", (3, 1), 1), [255, 255, 255]),
    (Image.new("L", (3, 1), 77), [77, 77, 77]),
])
def test_every_mode_becomes_the_rgb_it_shows(image, expected):
    rgb = images.to_rgb(image)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[0], np.repeat(np.array(expected, np.uint8)[:, None], 3, axis=1))


def test_palette_transparency_and_cmyk():
    rgb = np.asarray(images.to_rgb(_transparent_palette()))[0]
    np.testing.assert_array_equal(rgb, [[255, 0, 0], [255, 255, 255]])  # the transparent blue is white
    np.testing.assert_array_equal(np.asarray(images.to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))))[0],
                                  [[255, 0, 0]])


def test_samples_outside_the_range_they_are_read_in_are_an_error_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"^pic\.tif: floating-point image has samples in \[0, 255\]"):
        images.to_rgb(Image.fromarray(np.array([[0.0, 255.0]], dtype=np.float32)), file="pic.tif")
    with pytest.raises(DataError, match=r"16-bit integer image has samples in \[-5, 70000\]"):
        images.to_rgb(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))


# ---- huge files and shapes the processor refuses ------------------------------------------

def test_a_decompression_bomb_is_one_line_naming_file_limit_and_key(embedder, tmp_path):
    bomb = bomb_png(tmp_path / "huge.png")
    message = (rf"^{bomb}: image of 20000x20000 = 400000000 pixels is over the limit of 178956970 pixels "
               r"\(data.max_image_pixels; raise it to read this file\)")
    with pytest.raises(DataError, match=message):
        images.open_image(bomb)
    with pytest.raises(DataError, match="over the limit of 178956970 pixels"):
        embedder.encode(bomb, convert_to_tensor=True)


def test_the_pixel_limit_is_ours_both_ways(tmp_path, monkeypatch):
    bomb = bomb_png(tmp_path / "huge.png")
    monkeypatch.setattr(images, "_max_pixels", images.DEFAULT_MAX_PIXELS)
    images.set_max_pixels(400_000_000)
    assert images.image_size(bomb) == (20000, 20000)  # above PIL's own refusal, within ours
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's setting is left as it was
    draw_image("red").save(tmp_path / "small.png")
    images.set_max_pixels(4000)
    with pytest.raises(DataError, match=r"small.png: image of 64x64 = 4096 pixels is over the limit of 4000"):
        images.open_image(tmp_path / "small.png")


@pytest.mark.parametrize("size, ratio, resized", [((1, 4000), 4000, False), ((4000, 2), 2000, False),
                                                   ((30, 6000), 214, True)])
def test_a_shape_qwen2vl_refuses_is_a_data_error_naming_the_file(embedder, tmp_path, size, ratio, resized):
    """qwen-vl-utils and the Qwen2-VL processor raise for a side ratio over 200 (30x6000 passes
    on its own and fails once rounded to 28x5992): refused, as they do, in the collator that
    training, eval and mining share."""
    path = tmp_path / "odd.png"
    Image.new("RGB", size, "red").save(path)
    after = " after resizing into whole visual tokens" if resized else ""
    message = rf"^{path}: image of \d+x\d+ pixels{after} has an aspect ratio of {ratio}, over the 200"
    with pytest.raises(DataError, match=message):
        embedder.collator([{"image": str(path)}])
    with pytest.raises(DataError, match=message):
        embedder.encode(path, convert_to_tensor=True)


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (10, 40)])
def test_images_smaller_than_a_patch_are_enlarged_as_the_official_tooling_does(embedder, size):
    vector = embedder.encode(Image.new("RGB", size, "red"), convert_to_tensor=True)
    assert vector.shape == (64,)


def _copy_with(synthetic_dir: Path, tmp_path: Path, write) -> Path:
    data = tmp_path / "M-BEIR"
    shutil.copytree(synthetic_dir / "M-BEIR", data, symlinks=True)
    target = data / POOL_IMAGE
    target.unlink()
    write(target)
    return data


@pytest.mark.parametrize("kind, message", [
    ("bomb", "image of 20000x20000 = 400000000 pixels is over the limit of 178956970 pixels (data.max_image_pixels"),
    ("thin", "image of 1x4000 pixels has an aspect ratio of 4000, over the 200"),
    ("flat", "image of 4000x2 pixels has an aspect ratio of 2000, over the 200"),
])
def test_eval_mbeir_stops_with_exit_2_naming_the_image(tiny_model_dir, synthetic_dir, tmp_path, capsys, kind, message):
    writers = {"bomb": bomb_png, "thin": lambda p: Image.new("RGB", (1, 4000), "red").save(p, format="PNG"),
               "flat": lambda p: Image.new("RGB", (4000, 2), "red").save(p, format="PNG")}
    data = _copy_with(synthetic_dir, tmp_path, writers[kind])
    code = main(["eval", "mbeir", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "eval"), "--set", "eval.mbeir.rows=[nights_task4]", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    line = err[err.index("umarvel: error: "):]  # after the progress bar's carriage return
    assert code == 2
    assert line.startswith(f"umarvel: error: {data / POOL_IMAGE}: {message}")
    assert line.count("\n") == 1
    assert not (tmp_path / "eval").exists() or not list((tmp_path / "eval").rglob("*.json"))


def test_eval_reads_the_pixel_limit_from_the_config(tiny_model_dir, synthetic_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(images, "_max_pixels", images.DEFAULT_MAX_PIXELS)
    code = main(["eval", "mbeir", "--model", str(tiny_model_dir), "--data", str(synthetic_dir / "M-BEIR"),
                 "--output-dir", str(tmp_path / "eval"), "--set", "eval.mbeir.rows=[nights_task4]",
                 "--cache-dir", str(tmp_path / "c"), "--set", "data.max_image_pixels=3000"])
    assert code == 2
    assert "= 3136 pixels is over the limit of 3000 pixels (data.max_image_pixels" in capsys.readouterr().err


def test_validate_reports_the_image_at_its_record(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_max_pixels", images.DEFAULT_MAX_PIXELS)
    data = _copy_with(synthetic_dir, tmp_path, lambda p: Image.new("RGB", (1, 4000), "red").save(p, format="PNG"))
    line = next(n for n, text in enumerate((data / POOL_FILE).read_text().splitlines(), 1) if POOL_IMAGE in text)
    errors = [str(e) for e in validate(data).errors]
    assert errors == [f"{data / POOL_FILE}:{line}: image {data / POOL_IMAGE}: image of 1x4000 pixels has an aspect "
                      "ratio of 4000, over the 200 that Qwen2-VL's image processor accepts; crop or pad it "
                      "(field 'img_path')"]
    images.set_max_pixels(3000)
    errors = [str(e) for e in validate(data).errors]
    too_large = [e for e in errors if POOL_IMAGE not in e]  # the thin one has 4000 pixels
    assert too_large and all("= 3136 pixels is over the limit of 3000 pixels" in e for e in too_large)
    with pytest.raises(SystemExit) as stopped:
        main(["data", "validate", "--data", str(data), "--max-image-pixels", "0"])
    assert stopped.value.code == 2


# ---- the Python API and the MTEB adapter ------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (None, "cannot encode a NoneType; give a str (text), a PIL image, a pathlib.Path (image file) or an item dict, "
           "or a list of them"),
    (float("nan"), "cannot encode a float; give a str"),
    ({"text": 5}, "input 0: 'text' must be a str, got int"),
    ({"image": 3}, "input 0: 'image' must be an image file path (str or pathlib.Path), a PIL image or a list of "
                   "them, got int"),
    ({"image": []}, "input 0: 'image' is an empty list"),
    ({"image": [draw_image("red"), None]}, "input 0: 'image' must be an image file path .* got NoneType"),
    ({}, "input 0: an item dict needs a text, an image or a video, got {}"),
    ({"text": ""}, "input 0: an item dict needs a text, an image or a video, got {'text': ''}"),
    ("", "input 0: empty text"),
    ({"text": "a", "instruction": 7}, "input 0: 'instruction' must be a str, got int"),
])
def test_encode_refuses_what_it_cannot_embed(embedder, bad, message):
    with pytest.raises(DataError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        embedder.encode(bad, convert_to_tensor=True)


def test_mteb_batches_give_one_row_per_input_or_name_the_row():
    pytest.importorskip("mteb")
    from umarvel.evaluation.mteb_adapter import batch_items

    with pytest.raises(UmarvelError, match="^mteb input 11 has neither a text nor an image"):
        batch_items({"text": ["a", ""], "image": [draw_image("red"), None]}, start=10)
    with pytest.raises(UmarvelError, match="^mteb input 5 has neither a text nor an image"):
        batch_items({"text": [None]}, start=5)
    with pytest.raises(UmarvelError, match="^the mteb batch from input 3 on has no text or image column"):
        batch_items({}, start=3)


# ---- ids and numbers in ASCII digits ----------------------------------------------------------

@pytest.mark.parametrize("value", ["٣:12", "１:2", "1:１２", "1:١٢", "1:²", "1: 12", "1:-3", "1:"])
def test_ids_are_ascii_digits_only(value):
    with pytest.raises(DataError, match=rf"^q.jsonl:7: id '{value}' is not of the form '<dataset_id>:<index>' in "
                                        r"ASCII digits \(field 'qid'\)$"):
        parse_id(value, "q.jsonl", 7, "qid")


def test_records_with_non_ascii_ids_name_file_line_and_field():
    query = {"qid": "9:１２", "query_txt": "a", "query_img_path": None, "query_modality": "text",
             "pos_cand_list": ["9:1"], "neg_cand_list": [], "task_id": 0}
    with pytest.raises(DataError, match=r"^q.jsonl:3: id '9:１２' .* \(field 'qid'\)$"):
        parse_query(query, "q.jsonl", 3)
    with pytest.raises(DataError, match=r"^q.jsonl:3: id '9:٣' .* \(field 'pos_cand_list'\)$"):
        parse_query({**query, "qid": "9:12", "pos_cand_list": ["9:٣"]}, "q.jsonl", 3)
    candidate = {"txt": "a", "img_path": None, "modality": "text", "did": "٩:1"}
    with pytest.raises(DataError, match=r"^p.jsonl:4: id '٩:1' .* \(field 'did'\)$"):
        parse_candidate(candidate, "p.jsonl", 4)


@pytest.mark.parametrize("cells, field", [
    (["9:1", "0", "9:2", "1", "٣"], "task_id (column 5)"),
    (["9:1", "0", "9:2", "²", "0"], "relevance (column 4)"),
    (["9:1", "0", "9:2", "1", "３"], "task_id (column 5)"),
])
def test_qrels_numbers_are_ascii_digits(cells, field):
    bad = cells[4] if field.startswith("task") else cells[3]
    with pytest.raises(DataError, match="^" + re.escape(f"r.txt:2: expected an integer in ASCII digits, got '{bad}' "
                                                        f"(field '{field}')") + "$"):
        parse_qrels_line(cells, "r.txt", 2)


def test_an_instruction_row_in_arabic_indic_digits_is_not_dataset_3(tmp_path):
    path = tmp_path / "query_instructions.tsv"
    path.write_text("header\ttext\tx\tid\ti1\n" "text\timage\tEDIS\t٣\tFind the picture.\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:2: expected an integer in ASCII digits, got '٣' "
                                        r"\(field 'dataset_id \(column 4\)'\)$"):
        read_instruction_rows(path, ErrorLog("raise"))


def test_collator_reads_through_the_one_image_reader(embedder, tmp_path):
    """Training shares the collator: a 16-bit file there is scaled, not clipped."""
    Image.fromarray(grey_scene().astype(np.uint16) * 257).save(tmp_path / "16.png")
    Image.fromarray(grey_scene()).save(tmp_path / "8.png")
    collator: Collator = embedder.collator
    sixteen, eight = (collator([{"image": str(tmp_path / name)}])["pixel_values"] for name in ("16.png", "8.png"))
    np.testing.assert_array_equal(sixteen.numpy(), eight.numpy())
