"""Image-text matching: an image scores its true caption against a hard negative one.

Each image query ranks a gallery of exactly its two captions (Retrieval.galleries); accuracy is
the share of images whose positive scores strictly above the negative (a tie counts as wrong).
"""
from __future__ import annotations

from pathlib import Path

from umarvel.errors import DataError
from umarvel.evaluation.protocol import Retrieval
from umarvel.evaluation.zeroshot.base import (
    ZeroShotBenchmark,
    field,
    item_set,
    json_records,
    query_item,
    scores_by_candidate,
)
from umarvel.evaluation.zeroshot.metrics import pairwise_accuracy
from umarvel.evaluation.zeroshot.safe_load import load_torch_plain


def _pair_search(name: str, prefix: str, examples: list[tuple[str, Path, str, str]], instruction: str,
                 sources) -> Retrieval:
    """examples: (id, image, positive caption, negative caption) -> the two-caption search; its
    item sets are named `{prefix}-images` / `{prefix}-captions`."""
    queries = [query_item(eid, instruction, image=str(image)) for eid, image, _, _ in examples]
    captions = [c for eid, _, pos, neg in examples for c in ({"id": f"{eid}:pos", "text": pos},
                                                            {"id": f"{eid}:neg", "text": neg})]
    galleries = {eid: [f"{eid}:pos", f"{eid}:neg"] for eid, _, _, _ in examples}
    return Retrieval(name, item_set(f"{prefix}-images", queries, sources),
                     item_set(f"{prefix}-captions", captions, sources), k=2, galleries=galleries)


def _accuracy(rankings, search: Retrieval) -> float:
    if search.name not in rankings:
        raise DataError(f"no ranking for search {search.name!r} (got {sorted(rankings)})")
    scores = scores_by_candidate(rankings[search.name])
    pairs = {eid: (f"{eid}:pos", f"{eid}:neg") for eid in search.queries.ids}
    return pairwise_accuracy({eid: scores.get(eid, {}) for eid in pairs}, pairs)


class CCNeg(ZeroShotBenchmark):
    """`ccneg/ccneg_preprocessed.pt`: {"image_paths": [...], "annotations": [{"json": {"caption"},
    "sop_data": {"negative-prompt"}}]}; the last 40,000 rows are the test set (fewer rows: all).

    Image paths in the release are absolute on its authors' machine: their prefix
    RELEASE_PREFIX is replaced by the `ccneg/` folder, and relative paths resolve under it.
    Commas are dropped from the negative caption, as the official evaluation does.
    """

    name = "ccneg"
    paper = {"acc": 84.5}
    TEST_ROWS = 40_000
    RELEASE_PREFIX = "/workspace/datasets/cc3m/"

    def read(self) -> None:
        self.path = self.root / "ccneg" / "ccneg_preprocessed.pt"
        data = load_torch_plain(self.path)
        paths = field(data, "image_paths", list, self.path, None)
        annotations = field(data, "annotations", list, self.path, None)
        if len(paths) != len(annotations):
            raise DataError(f"{len(paths)} image paths but {len(annotations)} annotations", file=str(self.path))
        if not paths:
            raise DataError("no queries: image_paths and annotations are empty", file=str(self.path))
        self.rows = len(paths)
        start = max(0, self.rows - self.TEST_ROWS)
        self.examples = []
        for index in range(start, self.rows):
            record = annotations[index]
            caption = field(field(record, "json", dict, self.path, index), "caption", str, self.path, index)
            negative = field(field(record, "sop_data", dict, self.path, index), "negative-prompt", str, self.path,
                             index)
            image = self._image(paths[index], index)
            self.examples.append((f"r{index}", image, caption, negative.replace(",", "")))

    def _image(self, value, index: int) -> Path:
        if not isinstance(value, str):
            raise DataError(f"record {index}: an image path must be a string", file=str(self.path))
        return self.media("ccneg", value.removeprefix(self.RELEASE_PREFIX), where=self.path, record=index)

    @property
    def is_real_data(self) -> bool:
        return self.rows > self.TEST_ROWS and len(self.examples) == self.TEST_ROWS

    def retrievals(self) -> list[Retrieval]:
        return [_pair_search("itm", "ccneg", self.examples, self.instruction("itm"), [self.path])]

    def score(self, rankings) -> dict[str, float]:
        return {"acc": _accuracy(rankings, self.retrievals()[0])}


class SugarCrepe(ZeroShotBenchmark):
    """`sugar-crepe/data/{subset}.json`: {example id: {filename, caption, negative_caption}};
    images `sugar-crepe/images/val2017/{filename}`. Accuracy per subset and their mean."""

    name = "sugar_crepe"
    SUBSETS = {"add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652, "replace_rel": 1406,
               "swap_att": 666, "swap_obj": 245}  # the release's example counts
    paper = {"acc": 87.9}

    def read(self) -> None:
        self.subsets = {}
        for subset in self.SUBSETS:
            path = self.root / "sugar-crepe" / "data" / f"{subset}.json"
            examples = []
            for key, record in json_records(path, dict).items():
                name = field(record, "filename", str, path, key)
                image = self.media("sugar-crepe", "images", "val2017", name, where=path, record=key)
                examples.append((f"{subset}:{key}", image, field(record, "caption", str, path, key),
                                 field(record, "negative_caption", str, path, key)))
            self.subsets[subset] = (path, examples)

    @property
    def is_real_data(self) -> bool:
        return all(len(self.subsets[s][1]) == n for s, n in self.SUBSETS.items())

    def retrievals(self) -> list[Retrieval]:
        return [_pair_search(subset, f"sugar_crepe-{subset}", examples, self.instruction("itm"), [path])
                for subset, (path, examples) in self.subsets.items()]

    def score(self, rankings) -> dict[str, float]:
        out = {f"{search.name}_acc": _accuracy(rankings, search) for search in self.retrievals()}
        out["acc"] = sum(out.values()) / len(out)
        return out
