"""Caption <-> image retrieval both ways: Flickr30K 1K and MSCOCO 5K (five captions per image),
ShareGPT4V 1K and Urban1K (one long caption per image).

t2i: each caption ranks the images, its own image is the positive. i2t: each image ranks the
captions, any of its captions is a hit (the CLIP-style recall the official evaluation uses).
"""
from __future__ import annotations

import re
from pathlib import Path

from umarvel.data.files import read_utf8
from umarvel.errors import DataError
from umarvel.evaluation.protocol import Retrieval
from umarvel.evaluation.zeroshot.base import (
    Ids,
    ZeroShotBenchmark,
    field,
    item_set,
    json_records,
    query_item,
    ranked_ids,
)
from umarvel.evaluation.zeroshot.metrics import hit_rates


class CaptionImageBenchmark(ZeroShotBenchmark):
    """t2i and i2t over `images` [(image id, path)] and `captions` [(caption id, text, image id)]."""

    ks: tuple[int, ...] = (1, 5, 10)
    real_images: int

    images: list[tuple[str, Path]]
    captions: list[tuple[str, str, str]]
    sources: list[Path]

    @property
    def is_real_data(self) -> bool:
        return len(self.images) == self.real_images

    def retrievals(self) -> list[Retrieval]:
        t2i, i2t = self.instruction("t2i"), self.instruction("i2t")
        image_items = [{"id": iid, "image": str(path)} for iid, path in self.images]
        caption_items = [{"id": cid, "text": text} for cid, text, _ in self.captions]
        k = max(self.ks)
        return [
            Retrieval("t2i", item_set(f"{self.name}-caption-queries",
                                      [query_item(cid, t2i, text=text) for cid, text, _ in self.captions], self.sources),
                      item_set(f"{self.name}-images", image_items, self.sources), k=k),
            Retrieval("i2t", item_set(f"{self.name}-image-queries",
                                      [query_item(iid, i2t, image=str(path)) for iid, path in self.images], self.sources),
                      item_set(f"{self.name}-captions", caption_items, self.sources), k=k),
        ]

    def score(self, rankings) -> dict[str, float]:
        searches = {r.name: r for r in self.retrievals()}
        image_of = {cid: {iid} for cid, _, iid in self.captions}
        captions_of: dict[str, set[str]] = {iid: set() for iid, _ in self.images}
        for cid, _, iid in self.captions:
            captions_of[iid].add(cid)
        out = {}
        for name, positives in (("t2i", image_of), ("i2t", captions_of)):
            recall = hit_rates(ranked_ids(rankings, name, searches[name].queries), positives, self.ks)
            out.update({f"{name}_R@{k}": value for k, value in recall.items()})
        return out


class FiveCaptionBenchmark(CaptionImageBenchmark):
    """`{folder}/{text_file}`: a JSON list of 5N captions, caption i of image `{image_dir}/{i // 5}.png`."""

    folder: str
    image_dir: str
    text_file: str

    def read(self) -> None:
        text_path = self.root / self.folder / self.text_file
        texts = json_records(text_path)
        if len(texts) % 5:
            raise DataError(f"{len(texts)} captions is not five per image", file=str(text_path))
        for index, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"record {index}: a caption must be a non-empty string", file=str(text_path))
        self.images = [(str(i), self.media(self.folder, self.image_dir, f"{i}.png", where=text_path, record=5 * i))
                       for i in range(len(texts) // 5)]
        self.captions = [(f"c{index}", text, str(index // 5)) for index, text in enumerate(texts)]
        self.sources = [text_path]


class Flickr(FiveCaptionBenchmark):
    name = "flickr"
    folder, image_dir, text_file = "flickr", "images", "flickr_text.json"
    real_images = 1000
    paper = {"t2i_R@1": 85.4, "i2t_R@1": 93.3}


class MSCOCO(FiveCaptionBenchmark):
    """MSCOCO 5K: not in the paper's tables (no numbers to compare), read as Flickr is."""

    name = "mscoco"
    folder, image_dir, text_file = "coco", "coco_images", "coco_text.json"
    real_images = 5000


class ShareGPT4V(CaptionImageBenchmark):
    """`sharegpt4v/datas_for_validation.json`: [{image_name, caption}], images in `val_data/`."""

    name = "sharegpt4v"
    ks = (1,)
    real_images = 1000
    paper = {"t2i_R@1": 96.4, "i2t_R@1": 97.2}

    def read(self) -> None:
        path = self.root / "sharegpt4v" / "datas_for_validation.json"
        self.images, self.captions = [], []
        names = Ids("image", path)
        for index, record in enumerate(json_records(path)):
            name = field(record, "image_name", str, path, index)
            caption = field(record, "caption", str, path, index)
            image = self.media("sharegpt4v", "val_data", name, where=path, record=index)
            names.add(str(image), index)
            self.images.append((str(index), image))
            self.captions.append((f"c{index}", caption, str(index)))
        self.sources = [path]


class Urban1K(CaptionImageBenchmark):
    """`Urban1k/image/{i}.jpg` for i = 1..N, caption i on the first line of `Urban1k/caption/{i}.txt`."""

    name = "urban1k"
    ks = (1,)
    real_images = 1000
    paper = {"t2i_R@1": 96.7, "i2t_R@1": 93.5}

    def read(self) -> None:
        image_dir = self.root / "Urban1k" / "image"
        if not image_dir.is_dir():
            raise DataError("folder not found; see README (Zero-shot evaluation)", file=str(image_dir))
        numbers = sorted(int(m.group(1)) for p in image_dir.iterdir() if (m := re.fullmatch(r"([0-9]+)\.jpg", p.name)))
        if not numbers:
            raise DataError("no queries: the folder holds no images 1.jpg..N.jpg", file=str(image_dir))
        if numbers != list(range(1, len(numbers) + 1)):
            gap = next(i for i, n in enumerate(numbers, start=1) if i != n) if numbers else 1
            raise DataError(f"images must be 1.jpg..N.jpg; {gap}.jpg is missing", file=str(image_dir))
        self.images, self.captions, self.sources = [], [], []
        for number in numbers:
            caption_path = self.root / "Urban1k" / "caption" / f"{number}.txt"
            if not caption_path.is_file():
                raise DataError(f"caption of image {number}.jpg not found", file=str(caption_path))
            caption = read_utf8(caption_path).split("\n", 1)[0].strip()
            if not caption:
                raise DataError("first line (the caption) is empty", file=str(caption_path), line=1)
            self.images.append((str(number), self.media("Urban1k", "image", f"{number}.jpg", where=image_dir)))
            self.captions.append((f"c{number}", caption, str(number)))
            self.sources.append(caption_path)
