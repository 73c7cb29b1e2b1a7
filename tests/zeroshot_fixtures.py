"""Tiny copies of each zero-shot release, in exactly its public layout (see
umarvel/evaluation/zeroshot): a handful of PIL images, two-second videos written with PyAV."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def image(path: Path, index: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), COLOURS[index % len(COLOURS)]).save(path)
    return path


def video(path: Path, frames: int = 20, fps: int = 10, shade: int = 0) -> Path:
    """A clip whose frame i is a flat grey of level 10 * i (+ shade): frames are told apart by colour."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            pixels = np.full((32, 32, 3), min(255, 10 * i + shade), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def flickr(root: Path, images: int = 3, folder="flickr", image_dir="images", text_file="flickr_text.json"):
    for i in range(images):
        image(root / folder / image_dir / f"{i}.png", i)
    write_json(root / folder / text_file, [f"a {COLOURS[i // 5]} square, caption {i % 5}" for i in range(5 * images)])


def mscoco(root: Path, images: int = 2):
    flickr(root, images, folder="coco", image_dir="coco_images", text_file="coco_text.json")


def sharegpt4v(root: Path, images: int = 3):
    for i in range(images):
        image(root / "sharegpt4v" / "val_data" / f"sa_{i}.jpg", i)
    write_json(root / "sharegpt4v" / "datas_for_validation.json",
               [{"image_name": f"sa_{i}.jpg", "caption": f"A long caption of a {COLOURS[i]} square."}
                for i in range(images)])


def urban1k(root: Path, images: int = 3):
    for i in range(1, images + 1):
        image(root / "Urban1k" / "image" / f"{i}.jpg", i)
        path = root / "Urban1k" / "caption" / f"{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"A city street, {COLOURS[i]} light.\nsecond line is not the caption\n")


def circo(root: Path, images: int = 6):
    base = root / "circo"
    infos = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg"} for i in range(images)]
    for i, info in enumerate(infos):
        image(base / "images" / "unlabeled2017" / info["file_name"], i)
    write_json(base / "annotations" / "image_info_unlabeled2017.json", {"images": infos})
    queries = [
        {"id": 0, "reference_img_id": 100, "relative_caption": "is green", "shared_concept": "a square",
         "target_img_id": 101, "gt_img_ids": [101, 103]},
        {"id": 1, "reference_img_id": 102, "relative_caption": "is purple", "shared_concept": "a square",
         "target_img_id": 104, "gt_img_ids": [104]},
    ]
    write_json(base / "annotations" / "val.json", queries)
    write_json(base / "annotations" / "test.json", [{k: q[k] for k in ("id", "reference_img_id", "relative_caption",
                                                                       "shared_concept")} for q in queries])


def genecis(root: Path):
    base = root / "genecis"
    for task in ("change_object", "focus_object"):
        records = []
        for q in range(2):
            ids = [10 * q + k for k in range(4)]  # reference, target, two gallery images
            for k, image_id in enumerate(ids):
                image(base / "val2017" / f"{image_id:012d}.jpg", k)
            records.append({"reference": {"val_image_id": ids[0]}, "target": {"val_image_id": ids[1]},
                            "gallery": [{"val_image_id": i} for i in ids[2:]], "condition": "dog"})
        write_json(base / "annotations" / f"{task}.json", records)
    for task in ("change_attribute", "focus_attribute"):
        records = []
        for q in range(2):
            ids = [500 + q, 600 + q, 700 + q, 800 + q]
            for k, image_id in enumerate(ids):
                image(base / "vg" / task / f"{image_id}_{q}_{k}.jpg", k)
            records.append({"reference": {"image_id": ids[0]}, "target": {"image_id": ids[1]},
                            "gallery": [{"image_id": i} for i in ids[2:]], "condition": "red"})
        write_json(base / "annotations" / f"{task}.json", records)


def visdial(root: Path, dialogs: int = 3):
    base = root / "visdial"
    questions, answers = ["is it red", "is it big"], ["yes", "no"]
    entries = []
    for i in range(dialogs):
        image_id = 185565 + i
        image(base / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg", i)
        entries.append({"image_id": image_id, "caption": f"a {COLOURS[i]} square",
                        "dialog": [{"question": r % 2, "answer": (r + i) % 2, "answer_options": [0, 1],
                                    "gt_index": 0} for r in range(10)]})
    write_json(base / "visdial_1.0_val.json", {"version": "1.0", "split": "val",
                                               "data": {"questions": questions, "answers": answers,
                                                        "dialogs": entries}})


def fashioniq_multiturn(root: Path, images: int = 5):
    names = [f"B00{i}" for i in range(images)]
    for i, name in enumerate(names):
        image(root / "M-BEIR" / "mbeir_images" / "fashioniq_images" / f"{name}.jpg", i)
    write_json(root / "multiturnfashion" / "image_splits" / "split.all.val.json", names)
    write_json(root / "multiturnfashion" / "data" / "all.val.json", [
        {"reference": [["dress", ["is longer", ""], names[0]], ["dress", ["is blue", "has sleeves"], names[1]]],
         "target": ["dress", names[2]]},
        {"reference": [["shirt", ["is red"], names[3]]], "target": ["shirt", names[4]]},
    ])


def ccneg_data(root: Path, rows: int = 3) -> dict:
    """The .pt's content: image paths as the release writes them (absolute, authors' prefix)."""
    base = root / "ccneg"
    paths, annotations = [], []
    for i in range(rows):
        relative = f"ccneg_images/cc3m_subset_images_extracted_final/{i:09d}.jpg"
        image(base / relative, i)
        paths.append(f"/workspace/datasets/cc3m/{relative}")
        annotations.append({"json": {"caption": f"a {COLOURS[i]} square"},
                            "sop_data": {"negative-prompt": f"not a {COLOURS[i]}, square"}})
    return {"image_paths": paths, "annotations": annotations}


def ccneg(root: Path, rows: int = 3):
    import torch

    torch.save(ccneg_data(root, rows), root / "ccneg" / "ccneg_preprocessed.pt")


SUGAR_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def sugar_crepe(root: Path):
    base = root / "sugar-crepe"
    for i in range(2):
        image(base / "images" / "val2017" / f"{i:012d}.jpg", i)
    for subset in SUGAR_SUBSETS:
        write_json(base / "data" / f"{subset}.json", {
            str(i): {"filename": f"{i:012d}.jpg", "caption": f"a {COLOURS[i]} square",
                     "negative_caption": f"a {COLOURS[i + 1]} circle"} for i in range(2)})


def msrvtt(root: Path, videos: int = 2):
    base = root / "msrvtt"
    rows = ["key,vid_key,video_id,sentence"]
    for i in range(videos):
        video(base / "videos" / f"video{7000 + i}.mp4", shade=40 * i)
        rows.append(f"ret{i},msr{7000 + i},video{7000 + i},a clip number {i}")
    path = base / "annotations" / "MSRVTT_JSFUSION_test.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")


def msvd(root: Path, videos: int = 2):
    base = root / "MSVD"
    ids = [f"clip{i}_0_5" for i in range(videos)]
    for i, vid in enumerate(ids):
        video(base / "YouTubeClips" / f"{vid}.avi", shade=40 * i)
    (base / "test_list.txt").write_text("\n".join(ids) + "\n")
    captions = {vid: [["a", "man", "runs"], ["someone", "is", "running", str(i)]] for i, vid in enumerate(ids)}
    (base / "raw-captions.pkl").write_bytes(pickle.dumps(captions))


WRITERS = {"flickr": flickr, "mscoco": mscoco, "sharegpt4v": sharegpt4v, "urban1k": urban1k, "circo": circo,
           "genecis": genecis, "visdial": visdial, "fashioniq_multiturn": fashioniq_multiturn, "ccneg": ccneg,
           "sugar_crepe": sugar_crepe, "msrvtt": msrvtt, "msvd": msvd}


def write_all(root: Path) -> Path:
    for writer in WRITERS.values():
        writer(root)
    return root
