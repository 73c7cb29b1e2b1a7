"""The zero-shot readers keep M-BEIR's rules (issue #22): image and video files are part of the
cache key, paths stay under the data root (symlinks too, unless data.allow_symlinks_outside_root),
malformed files (unbalanced CSV quotes, repeated ids, empty sets, values of the wrong type, bytes
that are not UTF-8) are one-line errors naming the file and the line or record, and
`umarvel eval zeroshot` exits 2 on them without a traceback."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zeroshot_fixtures as fx
from PIL import Image

from umarvel.config import EncodeConfig
from umarvel.errors import DataError
from umarvel.evaluation.protocol import ItemSet
from umarvel.evaluation.runner import Runner
from umarvel.evaluation.zeroshot import TASKS
from umarvel.retrieval.encode import EmbeddingCache

ROOT = Path(__file__).resolve().parents[1]

# The annotation file of each task that a damaged example goes into (under the data root).
ANNOTATIONS = {
    "flickr": "flickr/flickr_text.json", "mscoco": "coco/coco_text.json",
    "sharegpt4v": "sharegpt4v/datas_for_validation.json", "circo": "circo/annotations/val.json",
    "genecis": "genecis/annotations/change_object.json", "visdial": "visdial/visdial_1.0_val.json",
    "fashioniq_multiturn": "multiturnfashion/data/all.val.json", "sugar_crepe": "sugar-crepe/data/add_att.json",
    "msrvtt": "msrvtt/annotations/MSRVTT_JSFUSION_test.csv", "msvd": "MSVD/test_list.txt",
}
# One image or video each task reads (the second of its kind), and the file whose error names it.
MEDIA = {
    "flickr": ("flickr/images/1.png", "flickr_text.json: record 5"),
    "mscoco": ("coco/coco_images/1.png", "coco_text.json: record 5"),
    "sharegpt4v": ("sharegpt4v/val_data/sa_1.jpg", "datas_for_validation.json: record 1"),
    "urban1k": ("Urban1k/image/2.jpg", "Urban1k/image"),
    "circo": ("circo/images/unlabeled2017/000000000102.jpg", "image_info_unlabeled2017.json: record 2"),
    "genecis": ("genecis/val2017/000000000011.jpg", "change_object.json: record 1"),
    "visdial": ("visdial/VisualDialog_val2018/VisualDialog_val2018_000000185566.jpg",
                r"visdial_1.0_val.json: record dialogs\[1\]"),
    "fashioniq_multiturn": ("M-BEIR/mbeir_images/fashioniq_images/B001.jpg", "split.all.val.json: record 1"),
    "ccneg": ("ccneg/ccneg_images/cc3m_subset_images_extracted_final/000000001.jpg", "ccneg_preprocessed.pt: record 1"),
    "sugar_crepe": ("sugar-crepe/images/val2017/000000000001.jpg", "add_att.json: record 1"),
    "msrvtt": ("msrvtt/videos/video7001.mp4", "MSRVTT_JSFUSION_test.csv:3"),
    "msvd": ("MSVD/YouTubeClips/clip1_0_5.avi", "test_list.txt:2"),
}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "data"


def build(task: str, root: Path, **kwargs):
    return TASKS[task](root, None, **kwargs)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def media_sets(benchmark) -> list[ItemSet]:
    """Every item set of the benchmark whose items name an image or a video."""
    sets = [s for r in benchmark.retrievals() for s in (r.queries, r.candidates)]
    return [s for s in sets if any("image" in item or "video" in item for item in s.items(0, len(s)))]


def rewrite(path: Path) -> None:
    """Replace a fixture's image or video by different content (as an edited or corrupted file is)."""
    if path.suffix in (".mp4", ".avi"):
        fx.video(path, frames=12, shade=120)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


# ---- the cache key covers the image and video files and the data root ---------------------------

@pytest.mark.parametrize("task", sorted(fx.WRITERS))
def test_every_item_set_fingerprints_its_media(root, task):
    """Each set naming images/videos changes its fingerprint when one of them is rewritten, and a
    copy of the data (same annotation files, same sizes and mtimes) has fingerprints of its own."""
    fx.WRITERS[task](root)
    sets = media_sets(build(task, root))
    assert sets and all(s.images is not None for s in sets)
    before = {s.name: s.images() for s in sets}
    copy = root.parent / "copy"
    shutil.copytree(root, copy)  # copy2: sizes and mtimes kept
    assert all(s.images() != before[s.name] for s in media_sets(build(task, copy)))
    rewrite(root / MEDIA[task][0])
    after = {s.name: s.images() for s in media_sets(build(task, root))}
    assert any(after[name] != value for name, value in before.items())


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model_dir):
    from umarvel.modeling.embedder import Embedder

    return Embedder.from_pretrained(tiny_model_dir, device="cpu")


def test_replaced_image_is_encoded_again_and_metrics_are_right(root, tmp_path, tiny_embedder):
    """Flickr with the same caption file: after image 1 is replaced, the next run (a new process:
    a new Runner on the same cache) encodes it again, its vector is the new image's, and its
    metrics are those of a run on an empty cache."""
    fx.flickr(root)
    config = EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no")
    flickr = build("flickr", root)
    first = Runner(tiny_embedder, config, progress=False)
    first.run(flickr, tmp_path / "out1")
    rewrite(root / "flickr" / "images" / "1.png")
    flickr = build("flickr", root)
    cached = Runner(tiny_embedder, config, progress=False)
    metrics = cached.run(flickr, tmp_path / "out2")
    images = flickr.retrievals()[0].candidates
    with tiny_embedder.prompt_overridden(**flickr.prompt_overrides):  # the sets the runs encoded
        old = first.encode(images).vectors().astype(np.float32)
        new = cached.encode(images).vectors().astype(np.float32)
        expected = tiny_embedder.encode(images.items(0, len(images)))
    assert np.abs(new - expected).max() < 2e-3
    assert np.abs(new[1] - old[1]).max() > 1e-2 and np.abs(new[0] - old[0]).max() < 2e-3
    fresh = Runner(tiny_embedder, EncodeConfig(cache_dir=str(tmp_path / "fresh"), use_gpu="no"), progress=False)
    assert metrics == fresh.run(build("flickr", root), tmp_path / "out3")


def test_second_copy_of_the_data_gets_its_own_cache_entry(root, tmp_path, tiny_embedder):
    fx.flickr(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    rewrite(copy / "flickr" / "images" / "0.png")
    runner = Runner(tiny_embedder, EncodeConfig(cache_dir=str(tmp_path / "cache"), use_gpu="no"), progress=False)
    original = runner.encode(build("flickr", root).retrievals()[0].candidates)
    copied = runner.encode(build("flickr", copy).retrievals()[0].candidates)
    assert original.directory != copied.directory
    assert np.abs(original.vectors()[0].astype(np.float32) - copied.vectors()[0].astype(np.float32)).max() > 1e-2


def test_encoding_an_empty_item_set_is_refused(tmp_path, tiny_embedder):
    cache = EmbeddingCache(tiny_embedder, EncodeConfig(cache_dir=str(tmp_path / "cache")), progress=False)
    source = tmp_path / "empty.json"
    source.write_text("[]")
    empty = ItemSet("empty-set", [], lambda start, stop: [], [source])
    with pytest.raises(DataError, match=re.escape(f"item set 'empty-set' is empty: nothing to encode or search "
                                                  f"(read from {source})")):
        cache.encode(empty)
    assert not any(p.name.startswith("empty-set") for p in cache.root.glob("*"))


# ---- paths stay under the data root -------------------------------------------------------------

def _plant(task: str, root: Path, stem: str) -> None:
    """Make the task's data name the file `stem` (+ the extension the layout adds) for its second
    image or video, as the annotation would spell it."""
    if task == "sharegpt4v":
        edit_json(root / ANNOTATIONS[task], lambda d: d[1].update(image_name=stem + ".jpg"))
    elif task == "circo":
        edit_json(root / "circo/annotations/image_info_unlabeled2017.json",
                  lambda d: d["images"][2].update(file_name=stem + ".jpg"))
    elif task == "genecis":
        edit_json(root / ANNOTATIONS[task], lambda d: d[1]["gallery"][0].update(val_image_id=stem))
    elif task == "fashioniq_multiturn":
        edit_json(root / "multiturnfashion/image_splits/split.all.val.json", lambda d: d.__setitem__(1, stem))
    elif task == "ccneg":
        data = fx.ccneg_data(root)
        data["image_paths"][1] = stem + ".jpg"
        torch.save(data, root / "ccneg" / "ccneg_preprocessed.pt")
    elif task == "sugar_crepe":
        edit_json(root / ANNOTATIONS[task], lambda d: d["1"].update(filename=stem + ".jpg"))
    elif task == "msrvtt":
        path = root / ANNOTATIONS[task]
        path.write_text(path.read_text().replace("video7001", stem))
    elif task == "msvd":
        (root / ANNOTATIONS[task]).write_text(f"clip0_0_5\n{stem}\n")
        captions = pickle.loads((root / "MSVD/raw-captions.pkl").read_bytes())
        (root / "MSVD/raw-captions.pkl").write_bytes(pickle.dumps({**captions, stem: [["a", "clip"]]}))


NAMED_BY_DATA = ["sharegpt4v", "circo", "genecis", "fashioniq_multiturn", "ccneg", "sugar_crepe", "msrvtt", "msvd"]


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
@pytest.mark.parametrize("task", NAMED_BY_DATA)
def test_paths_leaving_the_root_are_refused(root, tmp_path, task, how):
    """A name read from the data that climbs out with `../` or is absolute is refused (the file it
    names exists outside: the reader would otherwise read it), naming the file and record/line."""
    fx.WRITERS[task](root)
    outside = tmp_path / "outside" / "secret"
    fx.image(outside.with_suffix(".jpg"), 0)
    for ext in (".mp4", ".avi"):
        fx.video(outside.with_suffix(ext))
    stem = "../" * 12 + str(outside).lstrip("/") if how == "dotdot" else str(outside)
    if task == "ccneg" and how == "dotdot":
        stem = fx.ccneg_data(root)["image_paths"][0].rsplit("/", 2)[0] + "/" + stem  # the release's own prefix
    _plant(task, root, stem)
    where = MEDIA[task][1]
    with pytest.raises(DataError, match=rf"{where}: (image|video) path '.*secret\.(jpg|mp4|avi)' resolves outside "
                                        rf"the data root {re.escape(str(root))}"):
        build(task, root)


@pytest.mark.parametrize("task", sorted(fx.WRITERS))
def test_symlinks_leaving_the_root_need_the_opt_in(root, tmp_path, task):
    fx.WRITERS[task](root)
    link, where = MEDIA[task]
    outside = tmp_path / "elsewhere" / Path(link).name
    outside.parent.mkdir()
    shutil.move(root / link, outside)
    (root / link).symlink_to(outside)
    with pytest.raises(DataError, match=rf"{where}: (image|video) path '.*{re.escape(Path(link).name)}' is a symlink "
                                        rf"to {re.escape(str(outside))}, outside the data root .*"
                                        r"data.allow_symlinks_outside_root=true"):
        build(task, root)
    named = [item.get("image") or item.get("video", {}).get("path") for s in
             media_sets(build(task, root, symlinks_outside_root=True)) for item in s.items(0, len(s))]
    assert str(root / link) in [p for entry in named for p in (entry if isinstance(entry, list) else [entry])]


def test_symlink_inside_the_root_is_read(root):
    """COCO images shared between sets by a link that stays under the root need no opt-in."""
    fx.sugar_crepe(root)
    shared = root / "coco" / "val2017"
    shutil.move(root / "sugar-crepe" / "images" / "val2017", shared)
    (root / "sugar-crepe" / "images" / "val2017").symlink_to(shared)
    assert len(build("sugar_crepe", root).subsets["add_att"][1]) == 2


# ---- readers that would change metrics silently -------------------------------------------------

def _csv(root: Path, *rows: str) -> Path:
    fx.msrvtt(root)
    path = root / ANNOTATIONS["msrvtt"]
    path.write_text("key,vid_key,video_id,sentence\n" + "".join(row + "\n" for row in rows))
    return path


def test_msrvtt_unbalanced_quote_is_an_error_at_its_line(root):
    """An opening quote on line 2 would swallow line 3 into one sentence (one query less)."""
    _csv(root, 'ret0,msr7000,video7000,"a clip 0', 'ret1,msr7001,video7001,a clip 1"')
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:2: a quoted field runs from this line to line 3 "
                                        r"\(an unbalanced quote\?\)"):
        build("msrvtt", root)
    _csv(root, 'ret0,msr7000,video7000,"a clip 0', 'ret1,msr7001,video7001,a clip "1"')
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:2: not valid CSV: .* \(the record runs on to "
                                        r"line 3: an unbalanced quote\?\)$"):
        build("msrvtt", root)
    _csv(root, "ret0,msr7000,video7000,a clip 0", 'ret1,msr7001,video7001,"a clip 1')
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:3: not valid CSV: unexpected end of data$"):
        build("msrvtt", root)


def test_msrvtt_row_with_the_wrong_field_count(root):
    _csv(root, "ret0,msr7000,video7000,a clip 0", "ret1,msr7001,video7001,a clip, with a comma")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:3: 5 fields, the header has 4$"):
        build("msrvtt", root)
    _csv(root, "ret0,msr7000,video7000", "ret1,msr7001,video7001,a clip")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv:2: 3 fields, the header has 4$"):
        build("msrvtt", root)


def test_msrvtt_quoted_commas_and_blank_lines_still_read(root):
    _csv(root, 'ret0,msr7000,video7000,"a clip, with a comma"', "", "ret1,msr7001,video7001,a clip")
    assert [c[1:] for c in build("msrvtt", root).captions] == [("a clip, with a comma", "video7000"),
                                                               ("a clip", "video7001")]


def test_genecis_query_with_an_empty_gallery_is_an_error(root):
    """With no distractors the target is the only candidate: R@1 would count a hit for nothing."""
    fx.genecis(root)
    edit_json(root / ANNOTATIONS["genecis"], lambda d: d[1].update(gallery=[]))
    with pytest.raises(DataError, match=r"change_object.json: record 1: the gallery is empty.*\(field 'gallery'\)$"):
        build("genecis", root)


def _set(index, **fields):
    return lambda d: d[index].update(fields)


# (task, file under the root, change, message): a repeated id would overwrite or double an entry.
DUPLICATES = [
    ("circo", "circo/annotations/image_info_unlabeled2017.json",
     lambda d: d["images"][3].update(id=100),
     r"image_info_unlabeled2017.json: record 3: image id 100 repeats record 0$"),
    ("circo", "circo/annotations/image_info_unlabeled2017.json",
     lambda d: d["images"][3].update(file_name="000000000100.jpg"),
     r"image_info_unlabeled2017.json: record 3: file_name '000000000100.jpg' repeats record 0$"),
    ("sharegpt4v", "sharegpt4v/datas_for_validation.json", _set(2, image_name="sa_0.jpg"),
     r"datas_for_validation.json: record 2: image '.*sa_0.jpg' repeats record 0$"),
    ("visdial", "visdial/visdial_1.0_val.json", lambda d: d["data"]["dialogs"][2].update(image_id=185565),
     r"visdial_1.0_val.json: record dialogs\[2\]: image_id 185565 repeats record dialogs\[0\]$"),
    ("fashioniq_multiturn", "multiturnfashion/image_splits/split.all.val.json", lambda d: d.__setitem__(3, "B000"),
     r"split.all.val.json: record 3: image name 'B000' repeats record 0$"),
]


@pytest.mark.parametrize("task,file,change,message", DUPLICATES, ids=[f"{d[0]}-{i}" for i, d in enumerate(DUPLICATES)])
def test_repeated_ids_name_both_records(root, task, file, change, message):
    fx.WRITERS[task](root)
    edit_json(root / file, change)
    with pytest.raises(DataError, match=message):
        build(task, root)


def test_repeated_json_key_is_an_error(root):
    """Sugar-Crepe keys examples by id: a JSON object naming one twice keeps only the last."""
    fx.sugar_crepe(root)
    path = root / ANNOTATIONS["sugar_crepe"]
    record = '{"filename": "000000000000.jpg", "caption": "a", "negative_caption": "b"}'
    path.write_text(f'{{"0": {record},\n "0": {record}}}')
    with pytest.raises(DataError, match=r"add_att.json: key '0' appears twice in one JSON object"):
        build("sugar_crepe", root)


# (task, file, change, message): JSON values of the wrong type, read before as something else.
WRONG_TYPES = [
    ("circo", "circo/annotations/val.json", _set(0, id=True),
     r"val.json: record 0: expected int, got bool \(field 'id'\)"),
    ("circo", "circo/annotations/val.json", _set(0, gt_img_ids=["101"]),
     r"val.json: record 0: expected a list of image ids \(int\) \(field 'gt_img_ids'\)"),
    ("visdial", "visdial/visdial_1.0_val.json", lambda d: d["data"]["questions"].__setitem__(1, None),
     r"visdial_1.0_val.json: record data.questions\[1\]: expected str, got NoneType"),
    ("fashioniq_multiturn", "multiturnfashion/data/all.val.json",
     lambda d: d[0]["reference"][1].__setitem__(1, ["is blue", 7]),
     r"all.val.json: record 0: turn 2 must be \[_, \[texts\], image name\]"),
]


@pytest.mark.parametrize("task,file,change,message", WRONG_TYPES,
                         ids=[f"{d[0]}-{i}" for i, d in enumerate(WRONG_TYPES)])
def test_values_of_the_wrong_type_are_named(root, task, file, change, message):
    fx.WRITERS[task](root)
    edit_json(root / file, change)
    with pytest.raises(DataError, match=message):
        build(task, root)


def test_msvd_captions_must_be_a_list(root):
    fx.msvd(root)
    (root / "MSVD/raw-captions.pkl").write_bytes(pickle.dumps({"clip0_0_5": "a man runs", "clip1_0_5": []}))
    with pytest.raises(DataError, match=r"raw-captions.pkl: video clip0_0_5: expected a non-empty list of captions"):
        build("msvd", root)


# ---- empty sets ---------------------------------------------------------------------------------

def _empty_urban1k(root):
    for path in (root / "Urban1k" / "image").iterdir():
        path.unlink()


def _empty_ccneg(root):
    torch.save({"image_paths": [], "annotations": []}, root / "ccneg" / "ccneg_preprocessed.pt")


EMPTY = {
    "flickr": (lambda root: (root / ANNOTATIONS["flickr"]).write_text("[]"), r"flickr_text.json: no queries"),
    "mscoco": (lambda root: (root / ANNOTATIONS["mscoco"]).write_text("[]"), r"coco_text.json: no queries"),
    "sharegpt4v": (lambda root: (root / ANNOTATIONS["sharegpt4v"]).write_text("[]"),
                   r"datas_for_validation.json: no queries"),
    "urban1k": (_empty_urban1k, r"Urban1k/image: no queries: the folder holds no images"),
    "circo": (lambda root: (root / ANNOTATIONS["circo"]).write_text("[]"), r"val.json: no queries"),
    "genecis": (lambda root: (root / ANNOTATIONS["genecis"]).write_text("[]"), r"change_object.json: no queries"),
    "visdial": (lambda root: edit_json(root / ANNOTATIONS["visdial"], lambda d: d["data"].update(dialogs=[])),
                r"visdial_1.0_val.json: no queries: data.dialogs is empty"),
    "fashioniq_multiturn": (lambda root: (root / ANNOTATIONS["fashioniq_multiturn"]).write_text("[]"),
                            r"all.val.json: no queries"),
    "ccneg": (_empty_ccneg, r"ccneg_preprocessed.pt: no queries"),
    "sugar_crepe": (lambda root: (root / ANNOTATIONS["sugar_crepe"]).write_text("{}"), r"add_att.json: no queries"),
    "msrvtt": (lambda root: (root / ANNOTATIONS["msrvtt"]).write_text("key,vid_key,video_id,sentence\n"),
               r"MSRVTT_JSFUSION_test.csv: no queries"),
    "msvd": (lambda root: (root / ANNOTATIONS["msvd"]).write_text("\n"), r"test_list.txt: no queries"),
}


@pytest.mark.parametrize("task", sorted(EMPTY))
def test_empty_sets_are_named(root, task):
    fx.WRITERS[task](root)
    empty, message = EMPTY[task]
    empty(root)
    with pytest.raises(DataError, match=message):
        build(task, root)


# ---- bytes that are not UTF-8 -------------------------------------------------------------------

def _spoil_second_line(path: Path) -> None:
    """Put a Latin-1 'é' (byte 0xe9, not UTF-8) into the second line of a text file."""
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"a", b"\xe9", 1) if b"a" in lines[1] else b"\xe9" + lines[1]
    path.write_bytes(b"\n".join(lines))


NOT_UTF8_TEXT = {**ANNOTATIONS, "urban1k": "Urban1k/caption/1.txt"}


@pytest.mark.parametrize("task", sorted(NOT_UTF8_TEXT))
def test_text_that_is_not_utf8_names_file_and_line(root, task):
    fx.WRITERS[task](root)
    path = root / NOT_UTF8_TEXT[task]
    _spoil_second_line(path)
    with pytest.raises(DataError, match=rf"{re.escape(path.name)}:2: not UTF-8 text: byte b'\\xe9' at column \d+"):
        build(task, root)


def test_pickles_with_strings_that_are_not_utf8(root):
    fx.msvd(root)
    raw = pickle.dumps({"clip0_0_5": [["a", "café"]], "clip1_0_5": [["b"]]}, protocol=2)
    (root / "MSVD/raw-captions.pkl").write_bytes(raw.replace("café".encode(), b"caf\xe9\xe9"))
    with pytest.raises(DataError, match=r"raw-captions.pkl: not UTF-8 text: a string in it holds byte b'\\xe9'"):
        build("msvd", root)
    fx.ccneg(root)
    path = root / "ccneg" / "ccneg_preprocessed.pt"
    data = fx.ccneg_data(root)
    data["annotations"][0]["json"]["caption"] = "cafés"
    torch.save(data, path)
    import zipfile

    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in files if name.endswith("data.pkl"))
    files[pkl] = files[pkl].replace("cafés".encode(), b"caf\xe9\xe9s")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    with pytest.raises(DataError, match=r"ccneg_preprocessed.pt: not UTF-8 text: a string in it holds byte b'\\xe9'"):
        build("ccneg", root)


# ---- through the CLI: exit 2, one line, no traceback --------------------------------------------

def _break_sharegpt4v(root):
    edit_json(root / ANNOTATIONS["sharegpt4v"], lambda d: d[1].update(image_name="../../../etc/passwd"))


def _break_msrvtt(root):
    _csv(root, 'ret0,msr7000,video7000,"a clip 0', 'ret1,msr7001,video7001,a clip 1"')


CLI_CASES = [
    ("sharegpt4v", _break_sharegpt4v,
     r"datas_for_validation.json: record 1: image path 'sharegpt4v/val_data/../../../etc/passwd' resolves outside"),
    ("msrvtt", _break_msrvtt, r"MSRVTT_JSFUSION_test.csv:2: a quoted field runs from this line to line 3"),
    ("flickr", EMPTY["flickr"][0], r"flickr_text.json: no queries"),
    ("urban1k", lambda root: _spoil_second_line(root / "Urban1k/caption/3.txt"),
     r"3.txt:2: not UTF-8 text: byte b'\\xe9'"),
]


def _eval(task: str, root: Path, tmp_path: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umarvel", "eval", "zeroshot", "--task", task, "--data", str(root),
                           "--model", str(model), "--output-dir", str(tmp_path / "out"), "--cache-dir",
                           str(tmp_path / "cache"), *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("task,damage,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_exits_2_with_one_line(root, tmp_path, tiny_model_dir, task, damage, message):
    fx.WRITERS[task](root)
    damage(root)
    done = _eval(task, root, tmp_path, tiny_model_dir)
    errors = [line for line in done.stderr.splitlines() if line.startswith("umarvel: error: ")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out" / task / "results.json").exists()


def test_cli_symlink_setting_reaches_the_zeroshot_readers(root, tmp_path, tiny_model_dir, capsys):
    """`--set data.allow_symlinks_outside_root=true` is what lets a linked image be read (in
    process: the same `main` as `python -m umarvel`, without a second interpreter start)."""
    from umarvel.cli import main

    fx.flickr(root)
    outside = tmp_path / "elsewhere" / "1.png"
    outside.parent.mkdir()
    shutil.move(root / "flickr/images/1.png", outside)
    (root / "flickr/images/1.png").symlink_to(outside)
    argv = ["eval", "zeroshot", "--task", "flickr", "--data", str(root), "--model", str(tiny_model_dir),
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    assert f"is a symlink to {outside}, outside the data root" in capsys.readouterr().err
    assert main([*argv, "--set", "data.allow_symlinks_outside_root=true"]) == 0
    assert json.loads((tmp_path / "out" / "flickr" / "results.json").read_text())["metrics"]
