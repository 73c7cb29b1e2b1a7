"""Training sources besides M-BEIR, and our own files of mined negatives and teacher scores.

Every training source yields pairs in one shape, the one MBEIRTrainPairs yields too:
    {"query": item, "positive": item, "negatives": [item, ...]}
with items as in umarvel.data.mbeir ({"qid"|"did", "text", "image", "instruction", "modality"}).
Ids of NLI and CC3M items are derived from content ("nli:<hash of the sentence>",
"cc3m:<image file>"), so the same sentence or image twice in a batch is recognisable as such.

Formats read
------------
NLI (stage 1a): `nli_for_simcse.csv`, header `sent0,sent1,hard_neg` (the hard_neg column and
    its cells are optional). query = sent0, positive = sent1, negatives = [hard_neg] if given.
CC3M (stage 1b), chosen by file suffix:
    .json   LLaVA-595K form: one JSON object keyed by id, values
            {"h5v": ".../images/GCC_train_001941173.jpg", "instruct_ans": ["<caption>", ...],
             "instruction": optional str, "pos_text": optional str}.
            The image is h5v's *file name* under the image root (its directories name the
            machine that built the file). query = the first instruct_ans, with `instruction` as
            its instruction; positive = the image, with `pos_text` as its text if given.
    .jsonl  {"image": <path relative to the image root>, "caption": str} per line.

Formats written and read (ours)
-------------------------------
Mined hard negatives (`write_hard_negatives`), JSON lines:
    line 1   {"format": "umarvel-hard-negatives", "version": 1, "model": "<model fingerprint>",
              "params": {<every mining parameter: pool, top_k, threshold, ...>}}
    line 2+  {"qid": "9:1", "negatives": ["9:17", "9:4"], "scores": [0.71, 0.69]}
Teacher scores for distillation (`write_teacher_scores`), JSON lines:
    line 1   {"format": "umarvel-teacher-scores", "version": 1, "model": "<model fingerprint>",
              "params": {<alpha, recall model, reranker, top_k, ...>}}
    line 2+  {"qid": "9:1", "candidates": ["9:1", "9:17"], "scores": [0.93, 0.12]}
Rules, checked by writer and reader alike: ids are '<dataset_id>:<index>'; a qid appears once;
the id list and `scores` (finite numbers) have equal length; no id twice in one list.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import pyarrow as pa

from umarvel.data.arrowtable import (
    ArrowTable, ErrorLog, OnError, TableFormat, open_table, parse_json_object, read_lines, require_rows, stable_hash64,
)
from umarvel.data.files import resolve_under
from umarvel.data.mbeir import format_text, parse_id
from umarvel.errors import DataError
from umarvel.io import atomic_path

HARD_NEGATIVES = "umarvel-hard-negatives"
TEACHER_SCORES = "umarvel-teacher-scores"
SCORED_LIST_FIELD = {HARD_NEGATIVES: "negatives", TEACHER_SCORES: "candidates"}
FORMAT_VERSION = 1


def _text_item(id_: str, text: str, *, key: str = "did", instruction: str | None = None) -> dict:
    return {key: id_, "text": format_text(text), "image": None, "instruction": instruction, "modality": "text"}


def _content_id(prefix: str, text: str) -> str:
    return f"{prefix}:{stable_hash64(text):016x}"


# ---- NLI ----------------------------------------------------------------------------------

_NLI_FORMAT = TableFormat("nli", pa.schema([
    ("sent0", pa.string()), ("sent1", pa.string()), ("hard_neg", pa.string()), ("line", pa.int64()),
]))


def _nli_rows(path: Path):
    def produce(log: ErrorLog, meta: dict) -> Iterator[dict]:
        file = str(path)
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            missing = [c for c in ("sent0", "sent1") if c not in (header or [])]
            if missing:
                raise DataError(f"header must name the columns sent0,sent1[,hard_neg]; missing {missing}", file, 1)
            column = {name: header.index(name) for name in ("sent0", "sent1", "hard_neg") if name in header}
            for cells in reader:
                line = reader.line_num
                if not cells:
                    continue
                try:
                    if len(cells) != len(header):
                        raise DataError(f"expected {len(header)} columns, got {len(cells)}", file, line)
                    row = {name: cells[i].strip() for name, i in column.items()}
                    for name in ("sent0", "sent1"):
                        if not row[name]:
                            raise DataError("empty sentence", file, line, name)
                    yield {"sent0": row["sent0"], "sent1": row["sent1"], "hard_neg": row.get("hard_neg") or None,
                           "line": line}
                except DataError as err:
                    log.add(err)

    return produce


class NLIPairs:
    """SimCSE NLI triples as training pairs (stage 1a: text adaptation)."""

    def __init__(self, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 on_error: OnError = "raise"):
        self.table = require_rows(open_table(path, _NLI_FORMAT, _nli_rows(Path(path)), cache_dir=cache_dir,
                                             on_error=on_error), "NLI triples")

    @property
    def errors(self) -> list[DataError]:
        return self.table.errors

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict:
        row = self.table.row(index)
        negatives = [_text_item(_content_id("nli", row["hard_neg"]), row["hard_neg"])] if row["hard_neg"] else []
        return {
            "query": _text_item(f"nli:{row['line']}", row["sent0"], key="qid"),
            "positive": _text_item(_content_id("nli", row["sent1"]), row["sent1"]),
            "negatives": negatives,
        }


# ---- CC3M ---------------------------------------------------------------------------------

_CC3M_FORMAT = TableFormat("cc3m", pa.schema([
    ("id", pa.string()), ("caption", pa.string()), ("image", pa.string()), ("instruction", pa.string()),
    ("pos_text", pa.string()), ("line", pa.int64()),
]))
_SPACE = re.compile(r"[ \t\n\r]*")


def iter_object_members(path: Path) -> Iterator[tuple[int, str, object]]:
    """(line, key, value) of each member of a file holding one JSON object, with the line each
    member starts on (json.load would lose it). Malformed JSON stops the file: no resync."""
    file, text = str(path), path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        return line

    def skip(pos: int) -> int:
        return _SPACE.match(text, pos).end()

    def expect(pos: int, char: str) -> int:
        if text[pos:pos + 1] != char:
            found = repr(text[pos:pos + 1]) if pos < len(text) else "end of file"
            raise DataError(f"malformed JSON: expected '{char}', found {found}", file, line_at(pos))
        return skip(pos + 1)

    pos = expect(skip(0), "{")
    if text[pos:pos + 1] == "}":
        return
    while True:
        start = line_at(pos)
        try:
            key, pos = decoder.raw_decode(text, pos)
            if not isinstance(key, str):
                raise DataError("malformed JSON: object keys must be strings", file, start)
            pos = expect(skip(pos), ":")
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed JSON: {err.msg}", file, line_at(err.pos)) from None
        yield start, key, value
        pos = skip(pos)
        if text[pos:pos + 1] == "}":
            if skip(pos + 1) != len(text):
                raise DataError("malformed JSON: text after the object", file, line_at(pos + 1))
            return
        pos = expect(pos, ",")


def _optional_text(obj: dict, name: str, file: str, line: int) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", file, line, name)
    return (value.strip() or None) if value else None


def _llava_row(key: str, value, file: str, line: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"entry '{key}' must be an object, got {type(value).__name__}", file, line)
    h5v = value.get("h5v")
    if not isinstance(h5v, str) or not PurePosixPath(h5v).name:
        raise DataError("missing or empty image path", file, line, "h5v")
    answers = value.get("instruct_ans")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) or not answers[0].strip():
        raise DataError("expected a non-empty list whose first item is the caption", file, line, "instruct_ans")
    return {"id": key, "caption": answers[0].strip(), "image": PurePosixPath(h5v).name,
            "instruction": _optional_text(value, "instruction", file, line),
            "pos_text": _optional_text(value, "pos_text", file, line), "line": line}


def _pair_row(obj: dict, file: str, line: int) -> dict:
    for name in ("image", "caption"):
        if not isinstance(obj.get(name), str) or not obj[name].strip():
            raise DataError("missing or empty string", file, line, name)
    return {"id": f"line{line}", "caption": obj["caption"].strip(), "image": obj["image"].strip(),
            "instruction": None, "pos_text": None, "line": line}


def _cc3m_rows(path: Path, progress: bool | None):
    def produce(log: ErrorLog, meta: dict) -> Iterator[dict]:
        file = str(path)
        if path.suffix == ".jsonl":
            for line, raw in read_lines(path, progress):
                try:
                    yield _pair_row(parse_json_object(raw, file, line), file, line)
                except DataError as err:
                    log.add(err)
            return
        first_line: dict[str, int] = {}
        for line, key, value in iter_object_members(path):
            try:
                if key in first_line:
                    raise DataError(f"duplicate id '{key}' (first on line {first_line[key]})", file, line)
                first_line[key] = line
                yield _llava_row(key, value, file, line)
            except DataError as err:
                log.add(err)

    return produce


class CC3MPairs:
    """CC3M caption -> image pairs (stage 1b: cross-modal alignment); see the module docstring."""

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike, *,
                 cache_dir: str | os.PathLike | None = None, on_error: OnError = "raise", progress: bool | None = None,
                 symlinks_outside_root: bool = False):
        path = Path(path)
        if path.suffix not in (".json", ".jsonl"):
            raise DataError("a CC3M file must be LLaVA-style .json or {image, caption} .jsonl", str(path))
        self.image_root, self.symlinks_outside_root = Path(image_root), symlinks_outside_root
        self.image_field = "image" if path.suffix == ".jsonl" else "h5v"
        self.table = require_rows(open_table(path, _CC3M_FORMAT, _cc3m_rows(path, progress), cache_dir=cache_dir,
                                             on_error=on_error), "CC3M pairs")

    @property
    def errors(self) -> list[DataError]:
        return self.table.errors

    def __len__(self) -> int:
        return len(self.table)

    def image_path(self, row: dict) -> str:
        return resolve_under(self.image_root, row["image"], file=str(self.table.source), line=row["line"],
                             field=self.image_field, symlinks_outside_root=self.symlinks_outside_root)

    def __getitem__(self, index: int) -> dict:
        row = self.table.row(index)
        positive = {
            "did": f"cc3m:{row['image']}", "text": format_text(row["pos_text"]) if row["pos_text"] else None,
            "image": self.image_path(row), "instruction": None,
            "modality": "image,text" if row["pos_text"] else "image",
        }
        query = _text_item(f"cc3m:{row['id']}", row["caption"], key="qid", instruction=row["instruction"])
        return {"query": query, "positive": positive, "negatives": []}


# ---- mined negatives and teacher scores ---------------------------------------------------

def _scored_format(kind: str) -> TableFormat:
    return TableFormat(kind, pa.schema([
        ("qid", pa.string()), (SCORED_LIST_FIELD[kind], pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())), ("line", pa.int64()),
    ]), key="qid")


def parse_scored_header(obj: dict, kind: str, file: str, line: int = 1) -> dict:
    """Check the header record of a mined-negatives or teacher-scores file."""
    if obj.get("format") != kind:
        raise DataError(f"not a {kind} file: header format is {obj.get('format')!r}", file, line, "format")
    if obj.get("version") != FORMAT_VERSION:
        raise DataError(f"unsupported version {obj.get('version')!r} (this reader knows {FORMAT_VERSION})",
                        file, line, "version")
    if not isinstance(obj.get("model"), str) or not obj["model"]:
        raise DataError("missing model fingerprint", file, line, "model")
    if not isinstance(obj.get("params"), dict):
        raise DataError("expected an object of parameters", file, line, "params")
    return obj


def parse_scored_record(obj: dict, kind: str, file: str, line: int) -> dict:
    """Check one per-query record of a mined-negatives or teacher-scores file; return its row."""
    ids_field = SCORED_LIST_FIELD[kind]
    qid = obj.get("qid")
    if not isinstance(qid, str):
        raise DataError("missing or non-string qid", file, line, "qid")
    parse_id(qid, file, line, "qid")
    ids, scores = obj.get(ids_field), obj.get("scores")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError("expected a list of did strings", file, line, ids_field)
    for did in ids:
        parse_id(did, file, line, ids_field)
    if len(set(ids)) != len(ids):
        raise DataError("a did appears twice", file, line, ids_field)
    if not isinstance(scores, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores
    ):
        raise DataError("expected a list of finite numbers", file, line, "scores")
    if len(scores) != len(ids):
        raise DataError(f"{len(scores)} scores for {len(ids)} {ids_field}", file, line, "scores")
    return {"qid": qid, ids_field: ids, "scores": [float(s) for s in scores], "line": line}


def _scored_rows(path: Path, kind: str, progress: bool | None):
    def produce(log: ErrorLog, meta: dict) -> Iterator[dict]:
        file = str(path)
        lines = read_lines(path, progress)
        first = next(lines, None)
        if first is None:
            raise DataError(f"empty file: a {kind} file starts with a header line", file)
        meta["header"] = parse_scored_header(parse_json_object(first[1], file, first[0]), kind, file, first[0])
        for line, raw in lines:
            try:
                yield parse_scored_record(parse_json_object(raw, file, line), kind, file, line)
            except DataError as err:
                log.add(err)

    return produce


class ScoredLists:
    """Per-query lists of dids with scores (mined negatives or teacher scores), memory-mapped."""

    def __init__(self, table: ArrowTable, kind: str):
        self.table, self.kind, self.ids_field = table, kind, SCORED_LIST_FIELD[kind]

    @property
    def header(self) -> dict:
        return self.table.header

    @property
    def file(self) -> str:
        return str(self.table.source)

    @property
    def errors(self) -> list[DataError]:
        return self.table.errors

    def __len__(self) -> int:
        return len(self.table)

    def entry(self, index: int) -> tuple[str, list[str], list[float]]:
        row = self.table.row(index)
        return row["qid"], row[self.ids_field], row["scores"]

    def get(self, qid: str) -> tuple[list[str], list[float]] | None:
        index = self.table.find(qid)
        return None if index is None else self.entry(index)[1:]

    def __iter__(self) -> Iterator[tuple[str, list[str], list[float]]]:
        for row in self.table.rows():
            yield row["qid"], row[self.ids_field], row["scores"]


def _write_scored(path, kind: str, records: Iterable[dict], model: str, params: dict) -> Path:
    path = Path(path)
    header = parse_scored_header({"format": kind, "version": FORMAT_VERSION, "model": model, "params": params},
                                 kind, str(path))
    seen: set[str] = set()
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        for number, record in enumerate(records, 1):
            row = parse_scored_record(record, kind, str(path), number + 1)
            if row["qid"] in seen:
                raise DataError(f"qid '{row['qid']}' written twice", str(path), number + 1, "qid")
            seen.add(row["qid"])
            out.write(json.dumps({"qid": row["qid"], SCORED_LIST_FIELD[kind]: row[SCORED_LIST_FIELD[kind]],
                                  "scores": row["scores"]}) + "\n")
    return path


def write_hard_negatives(path: str | os.PathLike, records: Iterable[dict], *, model: str, params: dict) -> Path:
    """Write mined negatives atomically. `records`: {"qid", "negatives", "scores"} per query;
    `model`: fingerprint of the mining model; `params`: every mining parameter."""
    return _write_scored(path, HARD_NEGATIVES, records, model, params)


def write_teacher_scores(path: str | os.PathLike, records: Iterable[dict], *, model: str, params: dict) -> Path:
    """Write distillation teacher scores atomically. `records`: {"qid", "candidates", "scores"}."""
    return _write_scored(path, TEACHER_SCORES, records, model, params)


def read_hard_negatives(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                        on_error: OnError = "raise", progress: bool | None = None) -> ScoredLists:
    return _read_scored(path, HARD_NEGATIVES, cache_dir, on_error, progress)


def read_teacher_scores(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                        on_error: OnError = "raise", progress: bool | None = None) -> ScoredLists:
    return _read_scored(path, TEACHER_SCORES, cache_dir, on_error, progress)


def _read_scored(path, kind: str, cache_dir, on_error: OnError, progress) -> ScoredLists:
    path = Path(path)
    table = open_table(path, _scored_format(kind), _scored_rows(path, kind, progress),
                       cache_dir=cache_dir, on_error=on_error)
    return ScoredLists(table, kind)
