"""Read M-BEIR as published: queries, candidate pools, qrels, instructions and images.

Layout and record fields: shared/reference/mbeir-format.md; file names: umarvel.data.tasks.
Query and pool files are parsed once into memory-mapped Arrow tables (umarvel.data.arrowtable),
so the 1.33M-query union train file and the 5.6M-candidate union pool cost shared pages, not
millions of Python dicts per process.

Items, the one shape the collator, trainer and evaluators consume:
  query      {"qid", "text", "image", "instruction", "modality", "task_id", "dataset_id",
              "pos_cand_list", "neg_cand_list", "raw_text", "raw_instruction"}
  candidate  {"did", "text", "image", "instruction": None, "modality", "raw_text"}
`text` and `instruction` are kept apart because the embedder pools text tokens without the
instruction's; joined by one space they are the benchmark's query string (`format_query_text`).
`raw_text`/`raw_instruction` are the file's strings before formatting, for the official
normalisation (model.rules.text_format=release, `official_format`).
`image` is an absolute path under the dataset root, or None.

Instructions: at training time one is drawn per sample from a seeded `random.Random`; at
evaluation a query's instruction is picked by a stable hash of its qid, so every run (and every
process) shows a query the same instruction.
"""
from __future__ import annotations

import functools
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umarvel.data.arrowtable import (
    ArrowTable, ErrorLog, OnError, TableFormat, open_table, parse_json_object, read_lines, require_rows, stable_hash64,
)
from umarvel.data.files import decode_utf8, resolve_under
from umarvel.data.tasks import (
    DATASET_IDS, DATASETS, EVAL_ROWS_BY_NAME, GLOBAL_POOL, MODALITIES, QUERY_INSTRUCTIONS, TASKS, UNION_TRAIN_QUERIES,
    EvalRow, positive_pool_rows,
)
from umarvel.config import ConfigError
from umarvel.errors import DataError

if TYPE_CHECKING:
    from umarvel.data.sources import ScoredLists

SPLITS = ("train", "val", "test")

_QUERY_SCHEMA = pa.schema([
    ("qid", pa.string()), ("query_txt", pa.string()), ("query_img_path", pa.string()),
    ("query_modality", pa.string()), ("pos_cand_list", pa.list_(pa.string())),
    ("neg_cand_list", pa.list_(pa.string())), ("task_id", pa.int8()), ("line", pa.int64()),
])
_CANDIDATE_SCHEMA = pa.schema([
    ("did", pa.string()), ("txt", pa.string()), ("img_path", pa.string()),
    ("modality", pa.string()), ("line", pa.int64()),
])
QUERY_FORMAT = TableFormat("mbeir-query", _QUERY_SCHEMA, key="qid")
# The union train file is upsampled: small datasets' queries appear more than once.
UNION_QUERY_FORMAT = TableFormat("mbeir-union-query", _QUERY_SCHEMA, key="qid", unique_key=False)
CANDIDATE_FORMAT = TableFormat("mbeir-candidate", _CANDIDATE_SCHEMA, key="did")


# ---- text ---------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").strip()


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _end_sentence(text: str) -> str:
    return text if not text or text[-1] in ".?!" else text + "."


def format_text(text: str | None) -> str:
    """The benchmark's text normalisation: one line, stripped, first letter capitalised, final
    period added (unless it already ends in . ? or !)."""
    return _end_sentence(_capitalise(_one_line(text or "")))


def split_query_text(instruction: str | None, text: str | None) -> tuple[str | None, str | None]:
    """The benchmark query string in two parts (instruction, text), either None when absent.

    Joined by one space they equal `format_text(f"{instruction} {text}")`: the capital letter
    goes to whichever part comes first, the final period to whichever comes last.
    """
    instruction = _one_line(instruction or "") or None
    text = _one_line(text or "") or None
    if instruction is None or text is None:
        return (format_text(instruction) or None), (format_text(text) or None)
    return _capitalise(instruction), _end_sentence(text)


def format_query_text(instruction: str | None, text: str | None) -> str:
    """The query string the benchmark shows a model: `"<instruction> <query_txt>"`, formatted."""
    return " ".join(part for part in split_query_text(instruction, text) if part)


def official_format(text: str | None) -> str:
    """The official U-MARVEL `format_string` (dataset/datasets_mbeir.py): carriage returns
    deleted, newlines kept, whitespace then double quotes stripped at both ends (in that order,
    so spaces inside the quotes stay), first character capitalised, final period added."""
    return _end_sentence(_capitalise((text or "").replace("\r", "").strip().strip('"')))


def official_query_text(instruction: str, text: str | None, start: str = "", end: str = "") -> tuple[str, str]:
    """(instruction, text) as the official evaluation formats a query: the instruction on its
    own, then `official_format(f"{start}{instruction}{end} {text}")` as one string, whose text
    part (after the marked instruction) keeps its leading spaces and a leading quote and loses a
    trailing one. A query without text gets "" (the caller renders what the joined string adds)."""
    instruction = official_format(instruction)
    if not (text or "").strip():
        return instruction, ""
    prefix = f"{start}{instruction}{end}"
    return instruction, official_format(f"{prefix} {text}")[len(prefix):]


# ---- records ------------------------------------------------------------------------------

def _field(obj: dict, name: str, kinds: tuple[type, ...], file: str, line: int, *, default=...):
    if name not in obj:
        if default is ...:
            raise DataError("missing field", file, line, name)
        return default
    value = obj[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise DataError(f"expected {expected}, got {type(value).__name__} {value!r:.60}", file, line, name)
    return value


def ascii_int(value: str, file: str, line: int, field: str, *, signed: bool = False) -> int:
    """An integer written in ASCII digits (with `signed`, an optional leading '-'). Python's
    int() also reads Arabic-Indic ('٣') and fullwidth ('３') digits, so a number written in them
    would silently equal another; str.isdigit() admits superscripts ('²') that int() rejects."""
    digits = value[1:] if signed and value.startswith("-") else value
    if not (digits.isascii() and digits.isdigit()):
        raise DataError(f"expected an integer in ASCII digits, got '{value}'", file, line, field)
    return int(value)


def parse_id(value: str, file: str, line: int, field: str) -> int:
    """Check an id is '<dataset_id>:<index>', both ASCII digits (UniIR keys ids by their two
    numbers), with a known dataset id; return the dataset id."""
    prefix, sep, rest = value.partition(":")
    if not sep or not all(part.isascii() and part.isdigit() for part in (prefix, rest)):
        raise DataError(f"id '{value}' is not of the form '<dataset_id>:<index>' in ASCII digits", file, line, field)
    if int(prefix) not in DATASETS:
        raise DataError(f"id '{value}' names unknown dataset id {prefix} (known: 0-9)", file, line, field)
    return int(prefix)


def parse_modality(value: str, file: str, line: int, field: str) -> str:
    """One of text, image, image,text (a reordered 'text,image' is accepted)."""
    modality = ",".join(sorted(part.strip() for part in value.split(",")))
    if modality not in MODALITIES:
        raise DataError(f"unknown modality '{value}' (expected one of {', '.join(MODALITIES)})", file, line, field)
    return modality


def _check_content(modality: str, text, image, file: str, line: int, text_field: str, image_field: str) -> None:
    parts = modality.split(",")
    if "text" in parts and not (text and text.strip()):
        raise DataError(f"modality '{modality}' needs a non-empty text", file, line, text_field)
    if "image" in parts and not (image and image.strip()):
        raise DataError(f"modality '{modality}' needs an image path", file, line, image_field)


def _id_list(obj: dict, name: str, file: str, line: int, *, required: bool) -> list[str]:
    values = _field(obj, name, (list,), file, line, default=... if required else [])
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"expected a list of did strings, item {i} is {type(value).__name__}", file, line, name)
        parse_id(value, file, line, name)
    return values


def parse_query(obj: dict, file: str, line: int) -> dict:
    """Validate one query record; return its table row. Raises DataError naming the field."""
    qid = _field(obj, "qid", (str,), file, line)
    parse_id(qid, file, line, "qid")
    text = _field(obj, "query_txt", (str, type(None)), file, line, default=None)
    image = _field(obj, "query_img_path", (str, type(None)), file, line, default=None)
    modality = parse_modality(_field(obj, "query_modality", (str,), file, line), file, line, "query_modality")
    task_id = _field(obj, "task_id", (int,), file, line)
    if task_id not in TASKS:
        raise DataError(f"unknown task id {task_id} (known: {sorted(TASKS)})", file, line, "task_id")
    if TASKS[task_id][0] != modality:
        raise DataError(
            f"task {task_id} has {TASKS[task_id][0]} queries, not '{modality}'", file, line, "query_modality"
        )
    _check_content(modality, text, image, file, line, "query_txt", "query_img_path")
    positives = _id_list(obj, "pos_cand_list", file, line, required=True)
    if not positives:
        raise DataError("a query needs at least one positive did", file, line, "pos_cand_list")
    return {
        "qid": qid, "query_txt": text, "query_img_path": image, "query_modality": modality,
        "pos_cand_list": positives, "neg_cand_list": _id_list(obj, "neg_cand_list", file, line, required=False),
        "task_id": task_id, "line": line,
    }


def parse_candidate(obj: dict, file: str, line: int) -> dict:
    """Validate one candidate record; return its table row. Raises DataError naming the field."""
    did = _field(obj, "did", (str,), file, line)
    parse_id(did, file, line, "did")
    text = _field(obj, "txt", (str, type(None)), file, line, default=None)
    image = _field(obj, "img_path", (str, type(None)), file, line, default=None)
    modality = parse_modality(_field(obj, "modality", (str,), file, line), file, line, "modality")
    _check_content(modality, text, image, file, line, "txt", "img_path")
    return {"did": did, "txt": text, "img_path": image, "modality": modality, "line": line}


def jsonl_rows(path: Path, parse, progress: bool | None = None):
    """A RowProducer: parse every line of a JSON-lines file with `parse(obj, file, line)`."""

    def produce(log: ErrorLog, meta: dict) -> Iterator[dict]:
        file = str(path)
        for line, raw in read_lines(path, progress):
            try:
                yield parse(parse_json_object(raw, file, line), file, line)
            except DataError as err:
                log.add(err)

    return produce


# ---- text files ---------------------------------------------------------------------------

def text_lines(path: str | os.PathLike, log: ErrorLog) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line of a UTF-8 text file (qrels, TSV). A line that
    is not UTF-8 goes to `log` as a DataError naming the file, line and byte, and is left out."""
    file = str(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, decode_utf8(raw, file, number)
            except DataError as err:
                log.add(err)


# ---- instructions -------------------------------------------------------------------------

InstructionKey = tuple[int, str, str]  # (dataset_id, query modality, candidate modality)


def read_instruction_rows(path: str | os.PathLike, log: ErrorLog) -> dict[InstructionKey, tuple[str, ...]]:
    """Parse query_instructions.tsv: a header, then rows of query modality, candidate modality,
    dataset/task name, dataset_id, instruction 1..4 (empty cells dropped)."""
    file = str(path)
    table: dict[InstructionKey, tuple[str, ...]] = {}
    first_line: dict[InstructionKey, int] = {}
    for line, text in text_lines(path, log):
        if line == 1 or not text.strip():
            continue
        cells = text.rstrip("\r\n").split("\t")
        try:
            if len(cells) < 5:
                raise DataError(f"expected at least 5 tab-separated columns, got {len(cells)}", file, line)
            query_modality = parse_modality(cells[0], file, line, "query modality (column 1)")
            cand_modality = parse_modality(cells[1], file, line, "candidate modality (column 2)")
            dataset_id = ascii_int(cells[3].strip(), file, line, "dataset_id (column 4)")
            if dataset_id not in DATASETS:
                raise DataError(f"unknown dataset id '{cells[3]}'", file, line, "dataset_id (column 4)")
            key = (dataset_id, query_modality, cand_modality)
            if key in table:
                raise DataError(f"instructions for {key} already given on line {first_line[key]}", file, line)
            instructions = tuple(cell.strip() for cell in cells[4:] if cell.strip())
            if not instructions:
                raise DataError("no instruction text", file, line, "instructions (columns 5+)")
            table[key], first_line[key] = instructions, line
        except DataError as err:
            log.add(err)
    return table


class Instructions:
    """Query instructions looked up by (dataset_id, query modality, candidate modality)."""

    def __init__(self, table: dict[InstructionKey, tuple[str, ...]], file: str):
        self.table, self.file = table, file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Instructions":
        if not Path(path).is_file():
            raise DataError("file not found", str(path))
        return cls(read_instruction_rows(path, ErrorLog("raise")), str(path))

    def options(self, dataset_id: int, query_modality: str, cand_modality: str) -> tuple[str, ...]:
        try:
            return self.table[(dataset_id, query_modality, cand_modality)]
        except KeyError:
            raise DataError(
                f"no instruction for dataset {dataset_id} ({DATASETS.get(dataset_id)}), "
                f"{query_modality} -> {cand_modality}", self.file,
            ) from None

    def choose(self, qid: str, task_id: int, rng: random.Random | None = None) -> str:
        """Training (rng given): a seeded random pick. Evaluation (rng None): the same pick for
        the same qid in every run, by a stable hash (never Python's salted `hash`)."""
        options = self.options(int(qid.split(":", 1)[0]), *TASKS[task_id])
        if rng is not None:
            return rng.choice(options)
        return options[stable_hash64(qid) % len(options)]


# ---- queries and pools --------------------------------------------------------------------

class Queries:
    """One query file as a memory-mapped table; `item(i)` builds the query item."""

    def __init__(self, table: ArrowTable, root: Path, instructions: Instructions | None, *,
                 symlinks_outside_root: bool = False):
        self.table, self.root, self.instructions = table, root, instructions
        self.symlinks_outside_root = symlinks_outside_root

    def __len__(self) -> int:
        return len(self.table)

    @property
    def file(self) -> str:
        return str(self.table.source)

    def record(self, index: int) -> dict:
        return self.table.row(index)

    def find(self, qid: str) -> int | None:
        """Row of the first query with this qid."""
        return self.table.find(qid)

    def item(self, index: int, *, rng: random.Random | None = None, use_instruction: bool = True) -> dict:
        """Query item of row `index`; instruction drawn from `rng` (training) or by qid (eval)."""
        return self.item_from_record(self.table.row(index), rng=rng, use_instruction=use_instruction)

    def items(self, start: int = 0, stop: int | None = None, *, use_instruction: bool = True) -> Iterator[dict]:
        """Evaluation items in file order (deterministic instructions), for encoding."""
        for record in self.table.rows(start, stop):
            yield self.item_from_record(record, use_instruction=use_instruction)

    def item_from_record(self, record: dict, *, rng: random.Random | None = None, use_instruction: bool = True) -> dict:
        modality = record["query_modality"].split(",")
        instruction = None
        if use_instruction:
            if self.instructions is None:
                raise DataError("instructions/query_instructions.tsv is needed for instructed queries", self.file)
            instruction = self.instructions.choose(record["qid"], record["task_id"], rng)
        raw_instruction, raw_text = instruction, record["query_txt"] if "text" in modality else None
        instruction, text = split_query_text(raw_instruction, raw_text)
        image = None
        if "image" in modality:
            image = resolve_under(self.root, record["query_img_path"], file=self.file, line=record["line"],
                                  field="query_img_path", symlinks_outside_root=self.symlinks_outside_root)
        return {
            "qid": record["qid"], "text": text, "image": image, "instruction": instruction,
            "raw_text": raw_text, "raw_instruction": raw_instruction,
            "modality": record["query_modality"], "task_id": record["task_id"],
            "dataset_id": int(record["qid"].split(":", 1)[0]),
            "pos_cand_list": record["pos_cand_list"], "neg_cand_list": record["neg_cand_list"],
        }


class CandidatePool:
    """One candidate pool as a memory-mapped table with lookup by did."""

    def __init__(self, table: ArrowTable, root: Path, *, symlinks_outside_root: bool = False):
        self.table, self.root, self.symlinks_outside_root = table, root, symlinks_outside_root

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, did: str) -> bool:
        return self.table.find(did) is not None

    @property
    def file(self) -> str:
        return str(self.table.source)

    def dids(self) -> pa.ChunkedArray:
        return self.table.column("did")

    def item(self, index: int) -> dict:
        return self._item(self.table.row(index))

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """Candidate items in file order, for encoding."""
        for record in self.table.rows(start, stop):
            yield self._item(record)

    def get(self, did: str, *, needed_by: str | None = None) -> dict:
        """The candidate item with this did; a DataError (naming `needed_by`) if the pool lacks it."""
        index = self.table.find(did)
        if index is None:
            named_by = f" (named by {needed_by})" if needed_by else ""
            raise DataError(f"did '{did}' is not in the pool {self.file}{named_by}")
        return self.item(index)

    def _item(self, record: dict) -> dict:
        modality = record["modality"].split(",")
        image = None
        if "image" in modality:
            image = resolve_under(self.root, record["img_path"], file=self.file, line=record["line"], field="img_path",
                                  symlinks_outside_root=self.symlinks_outside_root)
        return {
            "did": record["did"], "text": format_text(record["txt"]) if "text" in modality else None,
            "image": image, "instruction": None, "modality": record["modality"],
            "raw_text": record["txt"] if "text" in modality else None,
        }


def open_queries(path: str | os.PathLike, root: str | os.PathLike, instructions: Instructions | None = None, *,
                 upsampled: bool = False, cache_dir: str | os.PathLike | None = None, on_error: OnError = "raise",
                 progress: bool | None = None, symlinks_outside_root: bool = False) -> Queries:
    """Any M-BEIR-format query file; images resolve under `root`. `upsampled`: qids may repeat.
    A file without a usable query is a DataError naming it."""
    path = Path(path)
    fmt = UNION_QUERY_FORMAT if upsampled else QUERY_FORMAT
    table = require_rows(open_table(path, fmt, jsonl_rows(path, parse_query, progress), cache_dir=cache_dir,
                                    on_error=on_error), "queries")
    return Queries(table, Path(root), instructions, symlinks_outside_root=symlinks_outside_root)


def open_pool(path: str | os.PathLike, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
              on_error: OnError = "raise", progress: bool | None = None,
              symlinks_outside_root: bool = False) -> CandidatePool:
    """Any M-BEIR-format candidate pool file; images resolve under `root`. A file without a
    usable candidate is a DataError naming it."""
    path = Path(path)
    table = require_rows(open_table(path, CANDIDATE_FORMAT, jsonl_rows(path, parse_candidate, progress),
                                    cache_dir=cache_dir, on_error=on_error), "candidates")
    return CandidatePool(table, Path(root), symlinks_outside_root=symlinks_outside_root)


QRELS_FIELDS = ("qid (column 1)", "iteration (column 2)", "did (column 3)", "relevance (column 4)",
                "task_id (column 5)")


def qrels_cells(text: str) -> list[str]:
    """The fields of one qrels line: separated by a run of spaces or by one tab (spaces around
    it allowed), so an empty cell of a tab-separated line (also the first or last) stays a cell,
    named as the missing field, rather than vanishing and moving the later fields into its column."""
    return re.split(r" *\t *| +", text.strip(" \r\n"))


def parse_qrels_line(cells: list[str], file: str, line: int) -> tuple[str, str, int, int]:
    """(qid, did, relevance, task_id) of one `qid 0 did relevance task_id` line."""
    if len(cells) != 5:
        raise DataError(f"expected 5 columns 'qid 0 did relevance task_id', got {len(cells)}", file, line)
    for value, field in zip(cells, QRELS_FIELDS):
        if not value.strip():
            raise DataError("missing field (an empty cell of 'qid 0 did relevance task_id')", file, line, field)
    qid, _, did, relevance, task_id = cells
    parse_id(qid, file, line, QRELS_FIELDS[0])
    parse_id(did, file, line, QRELS_FIELDS[2])
    relevance_value = ascii_int(relevance, file, line, QRELS_FIELDS[3], signed=True)
    task = ascii_int(task_id, file, line, QRELS_FIELDS[4], signed=True)
    if task not in TASKS:
        raise DataError(f"unknown task id {task_id}", file, line, QRELS_FIELDS[4])
    return qid, did, relevance_value, task


def read_qrels_lines(path: str | os.PathLike, log: ErrorLog) -> Iterator[tuple[int, str, str, int, int]]:
    """(line, qid, did, relevance, task_id) of every well-formed qrels line; bad ones go to `log`."""
    file = str(path)
    for line, text in text_lines(path, log):
        if not text.strip():
            continue
        try:
            yield (line, *parse_qrels_line(qrels_cells(text), file, line))
        except DataError as err:
            log.add(err)


def no_positive_error(qid: str, query_file: str, query_line: int, qrels_file: str,
                      judged_line: int | None) -> DataError:
    """A query without a qrels line of relevance > 0 could only ever score 0. The error names
    the line to fix: the query's first qrels line when all of them judge relevance <= 0, else
    the query itself (it has no qrels line at all)."""
    if judged_line is not None:
        return DataError(f"query '{qid}' has no line with relevance > 0, only this one and others judging it "
                         "not relevant: it could only score 0; give its positive relevance 1 or remove the query",
                         qrels_file, judged_line, QRELS_FIELDS[3])
    return DataError(f"query '{qid}' has no line with relevance > 0 in {qrels_file}: it could only score 0; "
                     "add its positive's qrels line or remove the query", query_file, query_line, "qid")


def read_qrels(path: str | os.PathLike, log: ErrorLog) -> dict[str, set[str]]:
    """qid -> relevant dids; lines with relevance <= 0 are dropped."""
    qrels: dict[str, set[str]] = {}
    for _, qid, did, relevance, _ in read_qrels_lines(path, log):
        if relevance > 0:
            qrels.setdefault(qid, set()).add(did)
    return qrels


def _as_row(row: EvalRow | str) -> EvalRow:
    if isinstance(row, EvalRow):
        return row
    try:
        return EVAL_ROWS_BY_NAME[row]
    except KeyError:
        raise DataError(f"unknown evaluation row '{row}' (known: {', '.join(EVAL_ROWS_BY_NAME)})") from None


def train_query_file(dataset: str) -> str:
    """Per-dataset train queries (all of the dataset's tasks in one file)."""
    return f"query/train/mbeir_{dataset}_train.jsonl"


def mbeir_root(path: str | os.PathLike) -> Path:
    """The M-BEIR root a path means: the directory itself, or the `M-BEIR/` it holds (the data/
    layout that `umarvel data synth` writes, with nli_for_simcse.csv and cc3m/ beside it)."""
    path = Path(path)
    return path / "M-BEIR" if (path / "M-BEIR").is_dir() else path


# ---- evaluation rows: the checks an evaluation relies on --------------------------------

_FIX = "fix the line, or run `umarvel data validate` for every problem of the tree"


def _first(table: pa.Table, mask) -> dict | None:
    """The first row of `table` where `mask` is true, or None."""
    index = pc.index(mask, True).as_py()
    return None if index is None or index < 0 else table.slice(index, 1).to_pylist()[0]


def check_query_datasets(queries: Queries, dataset_id: int) -> None:
    """Every qid names `dataset_id` (a query of another dataset would get its instructions)."""
    table = queries.table.table
    bad = _first(table, pc.invert(pc.starts_with(table.column("qid"), f"{dataset_id}:")))
    if bad is not None:
        raise DataError(f"a {DATASETS[int(bad['qid'].split(':', 1)[0])]} query in the {DATASETS[dataset_id]} "
                        f"file: {_FIX}", queries.file, bad["line"], "qid")


def check_row_queries(queries: Queries, row: EvalRow) -> None:
    """Every query of a row's file is of the row's dataset and task: the task picks the
    instruction, so a stray task_id silently changes the query the model sees."""
    check_query_datasets(queries, row.dataset_id)
    table = queries.table.table
    bad = _first(table, pc.not_equal(table.column("task_id"), row.task_id))
    if bad is not None:
        raise DataError(f"task {bad['task_id']} in the file of {row.name} (task {row.task_id}): {_FIX}",
                        queries.file, bad["line"], "task_id")


def check_row_pool(pool: CandidatePool, row: EvalRow) -> None:
    """Every candidate of a row's local pool has the task's candidate modality."""
    wanted = TASKS[row.task_id][1]
    table = pool.table.table
    bad = _first(table, pc.not_equal(table.column("modality"), wanted))
    if bad is not None:
        raise DataError(f"a {bad['modality']} candidate in the pool of {row.name} ({wanted} candidates): {_FIX}",
                        pool.file, bad["line"], "modality")


def check_row_qrels(lines: list[tuple[int, str, str, int, int]], file: str, row: EvalRow, queries: Queries,
                    pools: list[CandidatePool]) -> dict[str, set[str]]:
    """qid -> positive dids of a row's qrels lines, after checking them against the row.

    Every line is of the row's task; every positive line names a query of the row's file (a
    relevance-0 line changes nothing); every query has a line with relevance > 0 (else it could
    only score 0: `no_positive_error`); every positive is in the row's own local pool (`pools[0]`) or, for OVEN and
    InfoSeek, in a pool `positive_pool_rows` allows: there it counts as a miss locally, as in the
    reference scorer (umarvel.evaluation.metrics).
    """
    if not lines:
        raise DataError(f"no qrels lines: every query of {queries.file} needs its positives listed", file)
    for line, _, _, _, task_id in lines:
        if task_id != row.task_id:
            raise DataError(f"task {task_id} in the qrels of {row.name} (task {row.task_id}): {_FIX}",
                            file, line, "task_id (column 5)")
    positives = [entry for entry in lines if entry[3] > 0]
    known = queries.table.has_keys([qid for _, qid, _, _, _ in positives])
    if not known.all():
        line, qid = positives[int(np.argmin(known))][:2]
        raise DataError(f"qid '{qid}' is not in {queries.file}: {_FIX}", file, line, "qid (column 1)")
    qrels: dict[str, set[str]] = {}
    for _, qid, did, _, _ in positives:
        qrels.setdefault(qid, set()).add(did)
    table = queries.table.table
    unscored = _first(table, pc.invert(pc.is_in(table.column("qid"), value_set=pa.array(list(qrels), pa.string()))))
    if unscored is not None:
        judged = next((line for line, qid, _, _, _ in lines if qid == unscored["qid"]), None)
        raise no_positive_error(unscored["qid"], queries.file, unscored["line"], file, judged)
    dids = [did for _, _, did, _, _ in positives]
    placed = np.zeros(len(dids), dtype=bool)
    for pool in pools:
        placed |= pool.table.has_keys(dids)
    if not placed.all():
        line, _, did = positives[int(np.argmin(placed))][:3]
        where = " or ".join(pool.file for pool in pools)
        why = ("OVEN/InfoSeek positives may sit in each other's pool of the same task, no further" if len(pools) > 1
               else "M-BEIR puts every positive of this row in the row's own pool")
        raise DataError(f"positive '{did}' is not in {where} ({why}): {_FIX}", file, line, "did (column 3)")
    return qrels


def check_pools_disjoint(pools: list[CandidatePool]) -> None:
    """No did in two of these pools: their union (M-BEIR's global pool) holds each did once."""
    owners = np.concatenate([np.full(len(pool), i) for i, pool in enumerate(pools)])
    hashes = np.concatenate([pool.table.key_hashes() for pool in pools])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    for slot in np.flatnonzero((hashes[1:] == hashes[:-1]) & (owners[1:] != owners[:-1])):
        first, later = pools[owners[slot]], pools[owners[slot + 1]]
        for record in later.table.rows():
            if stable_hash64(record["did"]) == hashes[slot] and record["did"] in first:
                raise DataError(f"did '{record['did']}' is also in {first.file} (line "
                                f"{first.table.row(first.table.find(record['did']))['line']}): local pools must not "
                                f"share dids, the global pool is their union; {_FIX}", later.file, record["line"], "did")


class MBEIR:
    """An M-BEIR directory (or a directory holding `M-BEIR/`). Tables are cached under `cache_dir` (default: ~/.cache/umarvel).

    on_error='raise' stops at the first bad record with a DataError (file, line, field);
    'skip' leaves bad records out and lists them in the returned table's `.table.errors`.
    An evaluation row's files are checked against the row where they are read (the rules of
    `umarvel data validate` that would change a number: task and dataset of every query, the
    pool's candidate modality, qrels vs queries vs pools), so validating first is a help, not a duty.
    """

    def __init__(self, root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 on_error: OnError = "raise", progress: bool | None = None, symlinks_outside_root: bool = False):
        self.root = mbeir_root(root)
        if not self.root.is_dir():
            raise DataError("M-BEIR directory not found", str(self.root))
        self.cache_dir, self.on_error, self.progress = cache_dir, on_error, progress
        self.symlinks_outside_root = symlinks_outside_root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def queries(self, split: str, row: EvalRow | str | None = None, *, dataset: str | None = None) -> Queries:
        """Train: the union train file, or `dataset`'s train file. Val/test: the file of `row`."""
        if split == "train":
            if row is not None:
                raise ValueError("train queries come per dataset (dataset=...) or as the union file, not per row")
            if dataset is None:
                return self._queries(UNION_TRAIN_QUERIES, UNION_QUERY_FORMAT)
            if dataset not in DATASETS.values():
                raise DataError(f"unknown dataset '{dataset}'")
            queries = self._queries(train_query_file(dataset), QUERY_FORMAT)
            check_query_datasets(queries, DATASET_IDS[dataset])
            return queries
        _check_split(split)
        if row is None:
            raise ValueError(f"{split} queries are per evaluation row: pass row=")
        row = _as_row(row)
        queries = self._queries(row.query_file(split), QUERY_FORMAT)
        check_row_queries(queries, row)
        return queries

    def local_pool(self, row: EvalRow | str) -> CandidatePool:
        row = _as_row(row)
        pool = self._pool(row.local_pool_file())
        check_row_pool(pool, row)
        return pool

    def global_pool(self, split: str) -> CandidatePool:
        _check_split(split)
        return self._pool(GLOBAL_POOL.format(split=split))

    def qrels(self, split: str, row: EvalRow | str) -> dict[str, set[str]]:
        """qid -> positive dids of the row, checked against its queries and pools
        (`check_row_qrels`): a qrels file that disagrees with them would change the recall. Val
        and test only: train positives are the query files' pos_cand_list."""
        _check_split(split)
        if split == "train":
            raise ValueError("qrels are read for the val and test rows; train positives come with the queries")
        row = _as_row(row)
        path = self.path(row.qrels_file(split))
        if not path.is_file():
            raise DataError("file not found", str(path))
        lines = list(read_qrels_lines(path, ErrorLog(self.on_error)))
        pools = [self.local_pool(other) for other in positive_pool_rows(row)]
        return check_row_qrels(lines, str(path), row, self.queries(split, row), pools)

    @functools.cached_property
    def instructions(self) -> Instructions:
        return Instructions.load(self.path(QUERY_INSTRUCTIONS))

    def resolve_image(self, rel_path: str) -> str:
        return resolve_under(self.root, rel_path, symlinks_outside_root=self.symlinks_outside_root)

    def _queries(self, rel: str, fmt: TableFormat) -> Queries:
        instructions = self.instructions if self.path(QUERY_INSTRUCTIONS).is_file() else None
        return open_queries(self.path(rel), self.root, instructions, upsampled=fmt is UNION_QUERY_FORMAT,
                            cache_dir=self.cache_dir, on_error=self.on_error, progress=self.progress,
                            symlinks_outside_root=self.symlinks_outside_root)

    def _pool(self, rel: str) -> CandidatePool:
        return open_pool(self.path(rel), self.root, cache_dir=self.cache_dir, on_error=self.on_error,
                         progress=self.progress, symlinks_outside_root=self.symlinks_outside_root)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---- training sets ------------------------------------------------------------------------

def _by_score(scored: list[tuple[str, float]]) -> list[str]:
    """dids from the highest score down (ties keep the file's order)."""
    return [did for did, _ in sorted(scored, key=lambda pair: -pair[1])]


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random source of one training sample: reproducible in any worker, any order."""
    return random.Random(f"{seed}:{epoch}:{index}")


@dataclass(frozen=True)
class NegativeSelection:
    """How a query's mined negatives become its `num_negatives` training negatives.

    top:    the k highest-scored survivors of mining's filter (the paper, and its code);
    sample: a seeded draw of k among the `depth` highest-scored (an explicit variant).
    top_up: a query left with fewer than k is filled with random pool candidates (the reference
            code's fallback); off, such queries stop the stage at start, or with on_error=skip
            are dropped. Either way they are counted in the stage's metrics.
    """

    k: int = 0
    mode: Literal["top", "sample"] = "top"
    depth: int = 0
    top_up: bool = False


class MBEIRTrainPairs:
    """M-BEIR training pairs {"query", "positive", "negatives"} for the contrastive stages.

    Per sample and epoch, a seeded rng draws the instruction and one positive out of
    pos_cand_list; the negatives follow `NegativeSelection` (never a positive, never one
    twice). Queries whose positives are all missing from the pool are a DataError, or skipped
    and listed in `skipped` when on_error='skip'. `negative_stats` counts what the selection did.
    """

    def __init__(self, queries: Queries, pool: CandidatePool, *, seed: int = 0, use_instruction: bool = True,
                 hard_negatives: "ScoredLists | None" = None, negatives: NegativeSelection = NegativeSelection(),
                 on_error: OnError = "raise"):
        self.queries, self.pool, self.seed = queries, pool, seed
        self.use_instruction, self.hard_negatives, self.selection = use_instruction, hard_negatives, negatives
        self.epoch = 0
        log = ErrorLog(on_error)
        self.rows = self._rows_with_positives(log)
        self.skipped = log.kept
        if not len(self.rows):
            raise DataError(f"none of the {len(queries)} queries has a positive in the pool {pool.file}: nothing to "
                            "train on; check data.pool and data.train_queries", queries.file)
        self.negative_stats: dict = {}
        if negatives.k and hard_negatives is not None:
            self.rows = self._rows_with_enough_negatives(on_error)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        rng = sample_rng(self.seed, self.epoch, index)
        record = self.queries.record(int(self.rows[index]))
        query = self.queries.item_from_record(record, rng=rng, use_instruction=self.use_instruction)
        positives = [did for did in record["pos_cand_list"] if did in self.pool]
        positive = self.pool.get(rng.choice(positives))
        return {"query": query, "positive": positive, "negatives": self._negatives(record, rng)}

    def _negatives(self, record: dict, rng: random.Random) -> list[dict]:
        selection = self.selection
        if not selection.k or self.hard_negatives is None:
            return []
        positives = set(record["pos_cand_list"])
        mined = self.hard_negatives.get(record["qid"])
        ranked = _by_score([(did, score) for did, score in zip(*mined) if did not in positives] if mined else [])
        if selection.mode == "sample":
            top = ranked[: selection.depth]
            picked = rng.sample(top, min(selection.k, len(top)))
        else:
            picked = ranked[: selection.k]
        if len(picked) < selection.k and selection.top_up:
            picked += self._random_candidates(selection.k - len(picked), positives | set(picked), rng)
        if len(picked) < selection.k:
            raise DataError(f"query {record['qid']} has {len(picked)} mined negatives besides its positives, "
                            f"data.num_negatives asks for {selection.k}; set data.negative_top_up=true or mine more",
                            self.hard_negatives.file)
        return [self.pool.get(did, needed_by=f"the mined negatives of query {record['qid']}") for did in picked]

    def _random_candidates(self, count: int, taken: set[str], rng: random.Random) -> list[str]:
        found, attempts = [], 0
        while len(found) < count and attempts < 100 * count:
            attempts += 1
            did = self.pool.item(rng.randrange(len(self.pool)))["did"]
            if did not in taken:
                found.append(did)
                taken.add(did)
        return found

    def _rows_with_enough_negatives(self, on_error: OnError) -> np.ndarray:
        """The usable rows, after checking every query's mined list against k; fills negative_stats."""
        selection, mined = self.selection, self.hard_negatives
        needed = selection.depth if selection.mode == "sample" else selection.k
        if selection.mode == "sample" and selection.depth < selection.k:
            raise ConfigError(f"data.negative_sample_depth ({selection.depth}) must be at least data.num_negatives "
                              f"({selection.k}) to sample among the top negatives")
        kept_per_query = (mined.header or {}).get("params", {}).get("top_k")
        if isinstance(kept_per_query, int) and kept_per_query < needed:
            raise ConfigError(f"{mined.file} keeps {kept_per_query} negatives per query (mine.top_k), the stage needs "
                              f"{needed} (data.num_negatives{' / data.negative_sample_depth' if selection.mode == 'sample' else ''}): "
                              "mine again with mine.top_k >= that, or lower it")
        counts = self._mined_counts()
        short = counts < selection.k
        stats = {"selection": selection.mode, "num_negatives": selection.k, "sample_depth": selection.depth,
                 "queries": int(len(self.rows)), "queries_with_fewer": int(short.sum()),
                 "mean_mined_per_query": float(counts.mean()) if len(counts) else 0.0,
                 "top_up_slots_per_epoch": 0, "queries_dropped": 0}
        rows = self.rows
        if short.any() and selection.top_up:
            stats["top_up_slots_per_epoch"] = int((selection.k - counts[short]).sum())
        elif short.any():
            example = self.queries.record(int(self.rows[np.flatnonzero(short)[0]]))
            message = (f"{int(short.sum())} of {len(rows)} training queries have fewer than data.num_negatives="
                       f"{selection.k} mined negatives in {mined.file} (e.g. {example['qid']}: "
                       f"{int(counts[np.flatnonzero(short)[0]])}): mine deeper, lower data.num_negatives, "
                       "set data.negative_top_up=true (random pool candidates fill them), or data.on_error=skip "
                       "to train without them")
            if on_error == "raise":
                raise DataError(message, self.queries.file)
            rows = rows[~short]
            stats["queries_dropped"] = int(short.sum())
        self.negative_stats = stats
        return rows

    def _mined_counts(self) -> np.ndarray:
        """Mined negatives listed for each usable row's query (0 when the file has none)."""
        mined = self.hard_negatives.table.table
        qids = self.queries.table.table.column("qid").take(pa.array(self.rows))
        where = pc.index_in(qids, value_set=mined.column("qid"))
        lengths = pc.list_value_length(mined.column(self.hard_negatives.ids_field)).to_numpy(zero_copy_only=False)
        found = where.is_valid().to_numpy(zero_copy_only=False)
        counts = np.zeros(len(self.rows), dtype=np.int64)
        counts[found] = lengths[where.drop_null().to_numpy()]
        return counts

    def _rows_with_positives(self, log: ErrorLog) -> np.ndarray:
        usable = []
        for batch in self.queries.table.table.to_batches():
            positives = batch.column("pos_cand_list")
            found = self.pool.table.has_keys(pc.list_flatten(positives).to_pylist())
            ok = np.zeros(batch.num_rows, dtype=bool)
            ok[pc.list_parent_indices(positives).to_numpy()[found]] = True
            for index in np.flatnonzero(~ok):
                record = batch.slice(int(index), 1).to_pylist()[0]
                log.add(DataError(
                    f"none of the positives {record['pos_cand_list']} of query {record['qid']} is in the pool "
                    f"{self.pool.file}", self.queries.file, record["line"], "pos_cand_list",
                ))
            usable.append(ok)
        return np.flatnonzero(np.concatenate(usable)) if usable else np.zeros(0, dtype=np.int64)


class MBEIRDistillSet:
    """Distillation samples {"query", "candidates", "teacher_scores"} for the queries the teacher
    file scores (the paper uses 10% of the training queries, 50 candidates each)."""

    def __init__(self, queries: Queries, pool: CandidatePool, teacher, *, seed: int = 0, use_instruction: bool = True):
        self.queries, self.pool, self.teacher = queries, pool, teacher
        self.seed, self.use_instruction, self.epoch = seed, use_instruction, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.teacher)

    def __getitem__(self, index: int) -> dict:
        qid, candidates, scores = self.teacher.entry(index)
        row = self.queries.find(qid)
        if row is None:
            raise DataError(f"teacher scores name query '{qid}' which is not in {self.queries.file}",
                            self.teacher.file)
        rng = sample_rng(self.seed, self.epoch, index)
        query = self.queries.item(row, rng=rng, use_instruction=self.use_instruction)
        items = [self.pool.get(did, needed_by=f"the teacher scores of query {qid}") for did in candidates]
        return {"query": query, "candidates": items, "teacher_scores": scores}
