"""The paper's M-BEIR test numbers (headline metric per row, percent), to print beside ours.

Transcribed from the paper (PAPER): Table 7 (local pool: U-MARVEL, U-MARVEL+, LamRA-Ret),
Table 13 (local pool, per stage) and Table 14 (global pool). Columns are keyed by pool, then
by name; averages are the paper's own "Avg." (the plain mean of its 16 rows). They are shown
only beside an evaluation on M-BEIR itself (`is_published_mbeir`).
"""
from __future__ import annotations

from umarvel.data.tasks import EVAL_ROWS, PUBLISHED_POOL_SIZES

PAPER = ("Li et al., U-MARVEL: Unveiling Key Factors for Universal Multimodal Retrieval via Embedding Learning "
         "with MLLMs, arXiv:2507.14902")
PAPER_TABLES = {"local": "Tables 7 and 13", "global": "Table 14"}

# Row -> (progressive local, +hardneg local, U-MARVEL local, U-MARVEL global, U-MARVEL+ local,
#         LamRA-Ret local). mscoco_task0 U-MARVEL local is 84.4 in the main table (84.8 in Table 13).
_TABLE = {
    "visualnews_task0": (46.4, 47.5, 47.3, 47.2, 49.4, 41.6),
    "mscoco_task0": (84.0, 83.6, 84.4, 72.8, 85.6, 81.5),
    "fashion200k_task0": (34.4, 35.6, 33.6, 33.3, 34.2, 28.7),
    "webqa_task1": (92.4, 95.2, 97.1, 96.7, 98.5, 86.0),
    "edis_task2": (65.6, 72.9, 78.8, 78.7, 81.4, 62.6),
    "webqa_task2": (84.6, 86.9, 88.5, 87.7, 89.4, 81.2),
    "visualnews_task3": (45.7, 47.9, 47.3, 47.2, 50.5, 39.6),
    "mscoco_task3": (93.3, 93.1, 93.5, 93.5, 88.4, 90.6),
    "fashion200k_task3": (35.4, 35.6, 35.1, 34.9, 37.7, 30.4),
    "nights_task4": (31.4, 33.0, 34.2, 34.0, 34.7, 32.1),
    "oven_task6": (56.5, 58.9, 62.5, 58.3, 63.7, 54.1),
    "infoseek_task6": (55.1, 52.2, 58.3, 52.2, 62.9, 52.1),
    "fashioniq_task7": (35.4, 34.8, 36.4, 36.0, 38.2, 33.2),
    "cirr_task7": (58.7, 57.2, 60.7, 56.0, 63.2, 53.1),
    "oven_task8": (78.0, 80.8, 79.4, 73.1, 80.8, 76.2),
    "infoseek_task8": (72.7, 72.3, 74.7, 69.2, 78.9, 63.3),
}
_AVERAGES = (60.6, 61.7, 63.2, 60.7, 64.8, 56.6)
_COLUMNS = (
    ("local", "progressive"),
    ("local", "+hardneg"),
    ("local", "U-MARVEL"),
    ("global", "U-MARVEL"),
    ("local", "U-MARVEL+"),
    ("local", "LamRA-Ret"),
)

POOLS = ("local", "global")

# pool -> column name -> row name -> headline percent
PAPER_HEADLINES: dict[str, dict[str, dict[str, float]]] = {
    pool: {
        name: {row.name: _TABLE[row.name][position] for row in EVAL_ROWS}
        for position, (column_pool, name) in enumerate(_COLUMNS)
        if column_pool == pool
    }
    for pool in POOLS
}
# pool -> column name -> the paper's 16-row average
PAPER_AVERAGES: dict[str, dict[str, float]] = {
    pool: {name: _AVERAGES[position] for position, (column_pool, name) in enumerate(_COLUMNS) if column_pool == pool}
    for pool in POOLS
}

# The columns a report shows by default: the final model, and with reranking where published.
DEFAULT_COLUMNS = {"local": ("U-MARVEL", "U-MARVEL+"), "global": ("U-MARVEL",)}


def pool_size_mismatches(pool_sizes: dict[str, int]) -> list[str]:
    """Rows whose local pool is not the published one, as "row: N candidates (M-BEIR: M)"."""
    return [
        f"{name}: {size:,} candidates (M-BEIR: {PUBLISHED_POOL_SIZES[name]:,})"
        for name, size in pool_sizes.items()
        if PUBLISHED_POOL_SIZES.get(name) != size
    ]


def is_published_mbeir(pool_sizes: dict[str, int]) -> bool:
    """Whether the evaluated pools are M-BEIR's own, so that the paper's numbers compare."""
    return bool(pool_sizes) and not pool_size_mismatches(pool_sizes)
