"""Composed image retrieval: reference image(s) + modification text -> target image.

CIRCO (val split, mAP@k over all COCO unlabeled images, several positives per query),
GeneCIS (four sub-tasks, each query ranks only its own small gallery) and multi-turn
FashionIQ (several reference images and modifications, R@5/8/10).
"""
from __future__ import annotations

from pathlib import Path

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
from umarvel.evaluation.zeroshot.metrics import hit_rates, mean_average_precision


class CIRCO(ZeroShotBenchmark):
    """`circo/annotations/val.json` queries over `image_info_unlabeled2017.json`'s images."""

    name = "circo"
    ks = (5, 10, 25, 50)
    paper = {"mAP@5": 36.2}
    REAL_QUERIES, REAL_IMAGES = 220, 123_403  # CIRCO val; COCO 2017 unlabeled

    def read(self) -> None:
        folder = self.root / "circo"
        info_path = folder / "annotations" / "image_info_unlabeled2017.json"
        info = json_records(info_path, dict)
        images = field(info, "images", list, info_path, None)
        self.image_paths: dict[str, Path] = {}
        ids, names = Ids("image id", info_path), Ids("file_name", info_path)
        for index, record in enumerate(images):
            image_id = field(record, "id", int, info_path, index)
            name = field(record, "file_name", str, info_path, index)
            ids.add(image_id, index)
            names.add(name, index)
            self.image_paths[str(image_id)] = self.media("circo", "images", "unlabeled2017", name, where=info_path,
                                                         record=index)
        self.queries_path = folder / "annotations" / "val.json"
        self.queries = []
        qids = Ids("id", self.queries_path)
        for index, record in enumerate(json_records(self.queries_path)):
            qid = field(record, "id", int, self.queries_path, index)
            qids.add(qid, index)
            reference = str(field(record, "reference_img_id", int, self.queries_path, index))
            caption = field(record, "relative_caption", str, self.queries_path, index)
            target = str(field(record, "target_img_id", int, self.queries_path, index))
            gt = field(record, "gt_img_ids", list, self.queries_path, index)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in gt):
                raise DataError(f"record {index}: expected a list of image ids (int)", file=str(self.queries_path),
                                field="gt_img_ids")
            for image_id in (reference, target, *map(str, gt)):
                if image_id not in self.image_paths:
                    raise DataError(f"record {index}: image id {image_id} is not in {info_path.name}",
                                    file=str(self.queries_path))
            self.queries.append((str(qid), reference, caption, {target, *map(str, gt)}))
        self.sources = [self.queries_path, info_path]

    @property
    def is_real_data(self) -> bool:
        return len(self.queries) == self.REAL_QUERIES and len(self.image_paths) == self.REAL_IMAGES

    def retrievals(self) -> list[Retrieval]:
        instruction = self.instruction("cir")
        queries = [query_item(qid, instruction, image=str(self.image_paths[ref]), text=caption)
                   for qid, ref, caption, _ in self.queries]
        candidates = [{"id": iid, "image": str(path)} for iid, path in self.image_paths.items()]
        return [Retrieval("cir", item_set("circo-val-queries", queries, self.sources),
                          item_set("circo-unlabeled2017", candidates, self.sources[1:]), k=max(self.ks))]

    def score(self, rankings) -> dict[str, float]:
        search = self.retrievals()[0]
        positives = {qid: gt for qid, _, _, gt in self.queries}
        result = mean_average_precision(ranked_ids(rankings, "cir", search.queries), positives, self.ks)
        return {f"mAP@{k}": value for k, value in result.items()}


class GeneCIS(ZeroShotBenchmark):
    """`genecis/annotations/{task}.json`: [{reference, target, gallery, condition}].

    Object tasks name COCO val2017 images by `val_image_id` (`genecis/val2017/{id:012d}.jpg`);
    attribute tasks use Visual Genome crops saved per query as
    `genecis/vg/{task}/{image_id}_{query}_{k}.jpg` (k = 0 reference, 1 target, 2.. gallery).
    Each query ranks the target and its own gallery only (Retrieval.galleries).
    """

    name = "genecis"
    TASKS = ("change_object", "focus_object", "change_attribute", "focus_attribute")
    ks = (1, 2, 3)
    paper = {"R@1": 19.1}
    REAL_MIN_QUERIES = 1000  # each released sub-task has about 2,000 queries (8K in all)

    def read(self) -> None:
        self.tasks = {task: self._read_task(task) for task in self.TASKS}

    def _read_task(self, task: str) -> dict:
        path = self.root / "genecis" / "annotations" / f"{task}.json"
        queries, images = [], {}
        for index, record in enumerate(json_records(path)):
            condition = field(record, "condition", str, path, index)
            gallery = field(record, "gallery", list, path, index)
            if not gallery:
                raise DataError(f"record {index}: the gallery is empty, so the target would be the only candidate "
                                "(a hit by construction); every GeneCIS query ranks its target among distractors",
                                file=str(path), field="gallery")
            roles = [field(record, "reference", dict, path, index), field(record, "target", dict, path, index),
                     *gallery]
            ids = [self._image(task, path, index, k, entry, images) for k, entry in enumerate(roles)]
            queries.append({"id": f"{task}:{index}", "image": ids[0], "text": condition,
                            "target": ids[1], "gallery": ids[1:]})
        return {"path": path, "queries": queries, "images": images}

    def _image(self, task: str, path: Path, index: int, k: int, entry, images: dict[str, Path]) -> str:
        if task.endswith("object"):
            image_id = str(field(entry, "val_image_id", (int, str), path, index))
            cid = image_id
            parts = ("val2017", f"{image_id.zfill(12)}.jpg")
        else:
            image_id = str(field(entry, "image_id", (int, str), path, index))
            cid = f"{image_id}_{index}_{k}.jpg"
            parts = ("vg", task, cid)
        images[cid] = self.media("genecis", *parts, where=path, record=index)
        return cid

    @property
    def is_real_data(self) -> bool:
        return all(len(t["queries"]) >= self.REAL_MIN_QUERIES for t in self.tasks.values())

    def retrievals(self) -> list[Retrieval]:
        searches = []
        for task, data in self.tasks.items():
            instruction = self.instruction(task)
            queries = [query_item(q["id"], instruction, image=str(data["images"][q["image"]]), text=q["text"])
                       for q in data["queries"]]
            candidates = [{"id": cid, "image": str(p)} for cid, p in data["images"].items()]
            galleries = {q["id"]: q["gallery"] for q in data["queries"]}
            searches.append(Retrieval(task, item_set(f"genecis-{task}-queries", queries, [data["path"]]),
                                      item_set(f"genecis-{task}-images", candidates, [data["path"]]),
                                      k=max(self.ks), galleries=galleries))
        return searches

    def score(self, rankings) -> dict[str, float]:
        out: dict[str, float] = {}
        for search in self.retrievals():
            targets = {q["id"]: {q["target"]} for q in self.tasks[search.name]["queries"]}
            recall = hit_rates(ranked_ids(rankings, search.name, search.queries), targets, self.ks)
            out.update({f"{search.name}_R@{k}": value for k, value in recall.items()})
        for k in self.ks:
            out[f"R@{k}"] = sum(out[f"{task}_R@{k}"] for task in self.TASKS) / len(self.TASKS)
        return out


class MultiTurnFashionIQ(ZeroShotBenchmark):
    """`multiturnfashion/data/all.val.json`: [{reference: [[_, [texts], image], ...], target: [_, image]}],
    candidates `multiturnfashion/image_splits/split.all.val.json` (image names); images are
    M-BEIR's FashionIQ ones, `M-BEIR/mbeir_images/fashioniq_images/{name}.jpg`.

    A query is every turn's reference image (in order) and its modification texts, numbered by
    turn: our prompt puts images first (prompts.render), where the official code interleaves them.
    """

    name = "fashioniq_multiturn"
    ks = (5, 8, 10)
    paper = {"R@5": 65.7}
    REAL_MIN_QUERIES, REAL_MIN_CANDIDATES = 2000, 6000  # about 2.4K queries over 6.2K images

    def _image(self, name: str, where: Path, index) -> Path:
        return self.media("M-BEIR", "mbeir_images", "fashioniq_images", f"{name}.jpg", where=where, record=index)

    def read(self) -> None:
        folder = self.root / "multiturnfashion"
        self.query_path = folder / "data" / "all.val.json"
        self.candidate_path = folder / "image_splits" / "split.all.val.json"
        self.candidates = {}
        names = Ids("image name", self.candidate_path)
        for index, name in enumerate(json_records(self.candidate_path, what="candidates")):
            if not isinstance(name, str):
                raise DataError(f"record {index}: an image name must be a string", file=str(self.candidate_path))
            names.add(name, index)
            self.candidates[name] = self._image(name, self.candidate_path, index)
        self.queries = []
        for index, record in enumerate(json_records(self.query_path)):
            turns = field(record, "reference", list, self.query_path, index)
            target = field(record, "target", list, self.query_path, index)
            if not turns or len(target) < 2 or not isinstance(target[1], str):
                raise DataError(f"record {index}: needs turns in 'reference' and [_, image name] in 'target'",
                                file=str(self.query_path))
            if target[1] not in self.candidates:
                raise DataError(f"record {index}: target {target[1]} is not among the candidates of "
                                f"{self.candidate_path.name}", file=str(self.query_path))
            images, texts = [], []
            for turn_number, turn in enumerate(turns, start=1):
                if not (isinstance(turn, list) and len(turn) >= 3 and isinstance(turn[1], list)
                        and all(isinstance(t, str) for t in turn[1]) and isinstance(turn[2], str)):
                    raise DataError(f"record {index}: turn {turn_number} must be [_, [texts], image name]",
                                    file=str(self.query_path))
                images.append(str(self._image(turn[2], self.query_path, index)))
                texts.append(f"({turn_number}) " + " and ".join(t for t in turn[1] if t))
            self.queries.append((f"q{index}", images, " ".join(texts), target[1]))

    @property
    def is_real_data(self) -> bool:
        return len(self.queries) >= self.REAL_MIN_QUERIES and len(self.candidates) >= self.REAL_MIN_CANDIDATES

    def retrievals(self) -> list[Retrieval]:
        instruction = self.instruction("multiturn")
        queries = [query_item(qid, instruction, image=images, text=text) for qid, images, text, _ in self.queries]
        candidates = [{"id": name, "image": str(path)} for name, path in self.candidates.items()]
        return [Retrieval("multiturn", item_set("fashioniq-multiturn-queries", queries, [self.query_path]),
                          item_set("fashioniq-multiturn-images", candidates, [self.candidate_path]), k=max(self.ks))]

    def score(self, rankings) -> dict[str, float]:
        search = self.retrievals()[0]
        targets = {qid: {target} for qid, _, _, target in self.queries}
        recall = hit_rates(ranked_ids(rankings, "multiturn", search.queries), targets, self.ks)
        return {f"R@{k}": value for k, value in recall.items()}
