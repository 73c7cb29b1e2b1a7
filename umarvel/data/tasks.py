"""M-BEIR's fixed vocabulary: datasets, task ids, modalities and the 16 evaluation rows.

The one place these facts live (see shared/reference/mbeir-format.md); readers, the synthetic
benchmark, the evaluators and the report all import them from here.
"""
from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("text", "image", "image,text")

DATASETS = {
    0: "visualnews",
    1: "fashion200k",
    2: "webqa",
    3: "edis",
    4: "nights",
    5: "oven",
    6: "infoseek",
    7: "fashioniq",
    8: "cirr",
    9: "mscoco",
}
DATASET_IDS = {name: i for i, name in DATASETS.items()}

# task_id -> (query modality, candidate modality); task 5 is unused by M-BEIR.
TASKS = {
    0: ("text", "image"),
    1: ("text", "text"),
    2: ("text", "image,text"),
    3: ("image", "text"),
    4: ("image", "image"),
    6: ("image,text", "text"),
    7: ("image,text", "image"),
    8: ("image,text", "image,text"),
}

# Image folders under mbeir_images/; InfoSeek re-uses OVEN's.
IMAGE_DIRS = {name: f"{'oven' if name == 'infoseek' else name}_images" for name in DATASETS.values()}


@dataclass(frozen=True)
class EvalRow:
    dataset: str
    task_id: int
    headline_k: int
    recall_ks: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset}_task{self.task_id}"

    @property
    def headline(self) -> str:
        return f"R@{self.headline_k}"

    @property
    def dataset_id(self) -> int:
        return DATASET_IDS[self.dataset]

    @property
    def modalities(self) -> tuple[str, str]:
        return TASKS[self.task_id]

    def query_file(self, split: str) -> str:
        return f"query/{split}/mbeir_{self.name}_{split}.jsonl"

    def qrels_file(self, split: str) -> str:
        return f"qrels/{split}/mbeir_{self.name}_{split}_qrels.txt"

    def local_pool_file(self) -> str:
        suffix = "_test" if self.dataset == "mscoco" else ""
        return f"cand_pool/local/mbeir_{self.name}{suffix}_cand_pool.jsonl"


def _row(dataset: str, task_id: int) -> EvalRow:
    wide = dataset in ("fashion200k", "fashioniq")
    return EvalRow(dataset, task_id, 10 if wide else 5, (10, 20, 50) if wide else (1, 5, 10))


# The benchmark's row order; the paper's "Avg." is the plain mean of the 16 headline numbers.
EVAL_ROWS = tuple(
    _row(d, t)
    for d, t in [
        ("visualnews", 0), ("mscoco", 0), ("fashion200k", 0), ("webqa", 1),
        ("edis", 2), ("webqa", 2), ("visualnews", 3), ("mscoco", 3),
        ("fashion200k", 3), ("nights", 4), ("oven", 6), ("infoseek", 6),
        ("fashioniq", 7), ("cirr", 7), ("oven", 8), ("infoseek", 8),
    ]
)
EVAL_ROWS_BY_NAME = {row.name: row for row in EVAL_ROWS}

# Where a row's qrels positives may live. M-BEIR puts every positive in its row's own local pool,
# except OVEN's and InfoSeek's: they share Wikipedia entities, so some positives sit in the other
# one's pool of the same task. The reference scores those as misses locally (they can be hits
# only in the global pool); anywhere else, a positive outside the row's pool is broken data.
CROSS_POOL_DATASETS = ("oven", "infoseek")


def positive_pool_rows(row: EvalRow) -> tuple[EvalRow, ...]:
    """The rows whose local pools may hold `row`'s positives: its own first."""
    if row.dataset not in CROSS_POOL_DATASETS:
        return (row,)
    return (row,) + tuple(other for other in EVAL_ROWS if other != row and other.task_id == row.task_id
                          and other.dataset in CROSS_POOL_DATASETS)


# Candidates in each row's local pool as published: how an evaluation tells M-BEIR itself from
# a benchmark in its format (the synthetic one, a subset), whose numbers the paper's do not match.
PUBLISHED_POOL_SIZES = {
    "visualnews_task0": 542_246, "mscoco_task0": 5_000, "fashion200k_task0": 201_824, "webqa_task1": 544_457,
    "edis_task2": 1_047_067, "webqa_task2": 403_196, "visualnews_task3": 537_568, "mscoco_task3": 24_809,
    "fashion200k_task3": 61_707, "nights_task4": 40_038, "oven_task6": 676_667, "infoseek_task6": 611_651,
    "fashioniq_task7": 74_381, "cirr_task7": 21_551, "oven_task8": 335_135, "infoseek_task8": 481_782,
}

UNION_TRAIN_QUERIES = "query/union_train/mbeir_union_up_train.jsonl"
GLOBAL_POOL = "cand_pool/global/mbeir_union_{split}_cand_pool.jsonl"
QUERY_INSTRUCTIONS = "instructions/query_instructions.tsv"
IMAGES_ROOT = "mbeir_images"
