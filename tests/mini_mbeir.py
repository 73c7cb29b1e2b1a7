"""Hand-made M-BEIR directories and an embedder whose vectors the test dictates, so evaluator
tests can assert exact rankings instead of whatever a random tiny model happens to rank.

`write_mini_mbeir` writes only what the evaluators read: the test queries and qrels of the
given rows, their local pools, a one-candidate filler pool for every other row (the global pool
is the union of all 16), the query instructions, and a picture for every image query.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from umarvel.config import ModelConfig
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, QUERY_INSTRUCTIONS

FILLER_TEXT = "omega"


def text_candidate(did: str, text: str) -> dict:
    return {"txt": text, "img_path": None, "modality": "text", "did": did, "src_content": None}


def query(row_name: str, qid: str, text: str, positives: list[str]) -> dict:
    """A test query of the row, with a picture when the row's queries have one."""
    row = EVAL_ROWS_BY_NAME[row_name]
    modality = row.modalities[0]
    image = f"mbeir_images/{row.dataset}_images/{qid.replace(':', '_')}.png" if "image" in modality else None
    return {"qid": qid, "query_txt": text if "text" in modality else None, "query_img_path": image,
            "query_modality": modality, "query_src_content": None, "pos_cand_list": positives,
            "neg_cand_list": [], "task_id": row.task_id}


def filler_did(position: int) -> str:
    row = EVAL_ROWS[position]
    return f"{row.dataset_id}:{900 + position}"


def filler_candidate(root: Path, position: int) -> dict:
    """The one candidate of an unused row's pool, of the row's candidate modality (the readers
    refuse a pool holding another modality); its picture is written under `root`."""
    row = EVAL_ROWS[position]
    modality = row.modalities[1]
    did = filler_did(position)
    image = None
    if "image" in modality:
        image = f"mbeir_images/{row.dataset}_images/filler_{row.name}.png"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 200, 200)).save(root / image)
    return {"txt": FILLER_TEXT if "text" in modality else None, "img_path": image, "modality": modality,
            "did": did, "src_content": None}


def write_mini_mbeir(root: Path, queries: dict[str, list[dict]], pools: dict[str, list[dict]]) -> Path:
    """Write the M-BEIR directory `root`; rows missing from `pools` get one filler candidate."""
    for position, row in enumerate(EVAL_ROWS):
        pool = pools[row.name] if row.name in pools else [filler_candidate(root, position)]
        write_jsonl(root / row.local_pool_file(), pool)
    for name, records in queries.items():
        row = EVAL_ROWS_BY_NAME[name]
        write_jsonl(root / row.query_file("test"), records)
        qrels = [f"{r['qid']} 0 {did} 1 {row.task_id}" for r in records for did in r["pos_cand_list"]]
        (root / row.qrels_file("test")).parent.mkdir(parents=True, exist_ok=True)
        (root / row.qrels_file("test")).write_text("\n".join(qrels) + "\n")
        for number, record in enumerate(records):
            if record["query_img_path"]:
                picture = root / record["query_img_path"]
                picture.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (40 * number % 256, 120, 200)).save(picture)
    header = "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\n"
    lines = [f"{row.modalities[0]}\t{row.modalities[1]}\t{row.name}\t{row.dataset_id}\tFind what this asks for.\n"
             for row in EVAL_ROWS]
    (root / QUERY_INSTRUCTIONS).parent.mkdir(parents=True, exist_ok=True)
    (root / QUERY_INSTRUCTIONS).write_text(header + "".join(lines))
    return root


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


class KeywordEmbedder:
    """One axis per keyword: an item's vector is the normalised count of the keywords in its
    text, so "beta" vs "beta zeta" scores 1/sqrt(2) and unrelated texts score 0. A text without
    keywords lies on an axis of its own (embeddings are unit vectors; the cache checks it).
    Instructions and images are ignored. `encoded` lists the id of every item encoded, in call order."""

    dtype = torch.float32

    def __init__(self, keywords: list[str], weights_dir: Path):
        self.axis = {word: i for i, word in enumerate(keywords)}
        self.settings = ModelConfig(backbone=str(weights_dir))
        self.has_adapter = False
        self.encoded: list[str] = []

    def encode(self, items: list[dict], batch_size: int = 16, **options) -> np.ndarray:
        """Embedder.encode's signature and return type (float32 numpy); the pipeline options (workers,
        progress bar) change nothing here."""
        vectors = torch.zeros(len(items), len(self.axis) + 1)
        for row, item in enumerate(items):
            self.encoded.append(item.get("qid") or item["did"])
            for word in re.findall(r"[a-z]+", (item["text"] or "").lower()):
                if word in self.axis:
                    vectors[row, self.axis[word]] += 1
            if not vectors[row].any():
                vectors[row, -1] = 1
        return F.normalize(vectors, dim=-1).numpy()
