"""`umarvel data validate`: check a dataset directory and report every problem, not the first.

Why: a bad record in a 5.6M-line pool should cost minutes before training, not a crash hours
into a 64-GPU job. Files are streamed (memory: 8-byte hashes of the ids), every record goes
through the readers' own parsers (so the messages are the ones training would raise), and the
rules that span files are checked here:
- no file is empty; ids are unique per file (qids may repeat in the upsampled union train
  file) and no did is in two local pools (the global pool is their union);
- every did named by pos_cand_list, neg_cand_list or a qrels line is in a pool of its split
  (train: the union train pool; val/test: the local pools and the split's union pool), and a
  val/test positive is in its row's own local pool (OVEN/InfoSeek: or in the other's pool of
  the same task, umarvel.data.tasks.positive_pool_rows) - elsewhere it could never be a hit;
- qrels lines are of their row's task and a positive one names a query of the row (a
  relevance-0 line changes no recall); every query has a qrels line with relevance > 0, named at
  its relevance-0 line when it has one; queries sit in the file of their dataset/row;
- every query has an instruction for its (dataset, query modality, candidate modality);
- every image path stays under the root, symlinks resolved (unless symlinks_outside_root),
  exists, decodes fully with PIL (`Image.verify` alone passes a truncated JPEG) as training reads
  it (umarvel.data.images: within the pixel limit, a side ratio Qwen2-VL accepts).
A directory holding M-BEIR/ (the data/ layout) also gets nli_for_simcse.csv and cc3m/ checked.
"""
from __future__ import annotations

import tempfile
from array import array
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from umarvel.data.arrowtable import parse_json_object, read_lines, stable_hash64
from umarvel.data.files import resolve_under
from umarvel.data.images import UNREADABLE, check_aspect, open_image
from umarvel.data.mbeir import (
    SPLITS, mbeir_root, no_positive_error, parse_candidate, parse_query, read_instruction_rows, read_qrels_lines,
    train_query_file,
)
from umarvel.data.sources import CC3MPairs, NLIPairs
from umarvel.data.tasks import (
    DATASETS, EVAL_ROWS, EVAL_ROWS_BY_NAME, GLOBAL_POOL, QUERY_INSTRUCTIONS, TASKS, UNION_TRAIN_QUERIES, EvalRow,
    positive_pool_rows,
)
from umarvel.errors import DataError

ImageCheck = Literal["open", "exists", "skip"]


class Report:
    """Problems found (each a DataError with file, line, field) and the counts for the summary."""

    def __init__(self, emit: Callable[[DataError], None] | None = None):
        self.errors: list[DataError] = []
        self.emit = emit
        self.counts: dict[str, int] = {}
        self.row_counts: dict[tuple[str, str], int] = {}

    def add(self, err: DataError) -> None:
        self.errors.append(err)
        if self.emit:
            self.emit(err)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        columns = ("train", "val", "test", "pool", "qrels")
        lines = [f"{'row':20s}" + "".join(f"{c:>8s}" for c in columns)]
        for row in EVAL_ROWS:
            cells = [self.row_counts.get((row.name, c)) for c in columns]
            lines.append(f"{row.name:20s}" + "".join(f"{'-' if c is None else c:>8}" for c in cells))
        lines.append("")
        lines.extend(f"{name:52s} {count:>10,}" for name, count in self.counts.items())
        return "\n".join(lines)


class _Ids:
    """Ids seen in one file as 64-bit hashes with their lines; finds duplicates afterwards."""

    def __init__(self):
        self.hashes, self.lines = array("Q"), array("q")

    def add(self, key: str, line: int) -> None:
        self.hashes.append(stable_hash64(key))
        self.lines.append(line)

    def sorted_hashes(self) -> np.ndarray:
        return np.unique(np.frombuffer(self.hashes, dtype=np.uint64)) if self.hashes else np.zeros(0, np.uint64)

    def duplicate_lines(self) -> list[tuple[int, int]]:
        """(first line, later line) pairs whose ids hash alike (checked by string later)."""
        if not self.hashes:
            return []
        hashes, lines = np.frombuffer(self.hashes, dtype=np.uint64), np.frombuffer(self.lines, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        first_of: dict[int, int] = {}
        pairs = []
        for slot in same:
            first = first_of.setdefault(int(hashes[order[slot]]), int(lines[order[slot]]))
            pairs.append((first, int(lines[order[slot + 1]])))
        return pairs


def _contains(sorted_hashes: np.ndarray, key: str) -> bool:
    target = np.uint64(stable_hash64(key))
    slot = int(np.searchsorted(sorted_hashes, target))
    return slot < len(sorted_hashes) and sorted_hashes[slot] == target


class _ImageChecker:
    def __init__(self, root: Path, mode: ImageCheck, report: Report, symlinks_outside_root: bool):
        self.root, self.mode, self.report = root, mode, report
        self.symlinks_outside_root = symlinks_outside_root
        self.checked: set[int] = set()

    def check(self, rel_path: str, file: str, line: int, field: str) -> None:
        try:
            full = resolve_under(self.root, rel_path, file=file, line=line, field=field, must_exist=False,
                                 symlinks_outside_root=self.symlinks_outside_root)
        except DataError as err:
            self.report.add(err)
            return
        if self.mode == "skip" or stable_hash64(full) in self.checked:
            return
        self.checked.add(stable_hash64(full))
        if not Path(full).is_file():
            self.report.add(DataError(f"image not found: {full}", file, line, field))
        elif self.mode == "open":
            try:
                check_aspect(open_image(full).size, full)
            except DataError as err:  # read as training reads it: what fails here would fail there
                unreadable = err.message.startswith(UNREADABLE)
                message = f"image cannot be read by PIL ({err.message})" if unreadable else f"image {full}: {err.message}"
                self.report.add(DataError(message, file, line, field))
            except Exception as err:  # noqa: BLE001 - any failure to decode means training would fail here
                self.report.add(DataError(f"image cannot be read by PIL ({err})", file, line, field))


class MBEIRValidator:
    def __init__(self, root: Path, images: ImageCheck, report: Report, progress: bool | None,
                 symlinks_outside_root: bool = False):
        self.root, self.report, self.progress = root, report, progress
        self.images = _ImageChecker(root, images, report, symlinks_outside_root)
        self.instructions: dict | None = None
        self.missing_instructions: set = set()
        self.local: dict[str, np.ndarray] = {}

    def run(self) -> None:
        self.check_instructions()
        local_ids = {row.name: self.check_pool(row.local_pool_file(), row=row, required=True) for row in EVAL_ROWS}
        self.local = {name: ids.sorted_hashes() for name, ids in local_ids.items() if ids is not None}
        self._report_shared_dids(local_ids)
        known = {}
        for split in SPLITS:
            union = self.check_pool(GLOBAL_POOL.format(split=split), required=False)
            parts = [union.sorted_hashes()] if union is not None else []
            parts += list(self.local.values()) if split != "train" else []
            known[split] = np.unique(np.concatenate(parts)) if parts else None
        for dataset in DATASETS.values():
            if (self.root / train_query_file(dataset)).is_file():
                self.check_queries(train_query_file(dataset), "train", known["train"], dataset=dataset)
        if (self.root / UNION_TRAIN_QUERIES).is_file():
            self.check_queries(UNION_TRAIN_QUERIES, "train", known["train"], unique=False)
        for split in SPLITS:
            for row in EVAL_ROWS:
                qids = None
                if split != "train" and (split == "test" or (self.root / row.query_file(split)).is_file()):
                    qids = self.check_queries(row.query_file(split), split, known[split], row=row)
                if split == "test" or qids is not None or (self.root / row.qrels_file(split)).is_file():
                    self.check_qrels(row, split, known[split], qids)

    def _file(self, rel: str, required: bool) -> Path | None:
        path = self.root / rel
        if path.is_file():
            return path
        if required:
            self.report.add(DataError("file not found", str(path)))
        return None

    def _records(self, path: Path, parse) -> Iterator[tuple[int, dict]]:
        file = str(path)
        for line, raw in read_lines(path, self.progress):
            try:
                yield line, parse(parse_json_object(raw, file, line), file, line)
            except DataError as err:
                self.report.add(err)

    def _report_empty(self, path: Path, ids: _Ids, what: str) -> None:
        if not ids.lines:
            self.report.add(DataError(f"no {what} (the file is empty or every record is bad): an M-BEIR file needs "
                                      "at least one record", str(path)))

    def _report_duplicates(self, path: Path, ids: _Ids, field: str) -> None:
        pairs = ids.duplicate_lines()
        if not pairs:
            return
        value_at = _values_at(path, {line for pair in pairs for line in pair}, field)
        for first, later in pairs:
            if value_at[first] == value_at[later]:
                self.report.add(DataError(f"duplicate {field} '{value_at[later]}' (first on line {first})",
                                          str(path), later, field))

    def _report_shared_dids(self, local_ids: dict[str, _Ids | None]) -> None:
        """A did in two local pools: the global pool (their union) would hold it twice."""
        names = [name for name, ids in local_ids.items() if ids is not None and ids.hashes]
        if not names:
            return
        hashes = np.concatenate([np.frombuffer(local_ids[name].hashes, dtype=np.uint64) for name in names])
        lines = np.concatenate([np.frombuffer(local_ids[name].lines, dtype=np.int64) for name in names])
        pools = np.concatenate([np.full(len(local_ids[name].lines), i) for i, name in enumerate(names)])
        order = np.argsort(hashes, kind="stable")
        hashes, lines, pools = hashes[order], lines[order], pools[order]
        pairs = [(int(slot), int(slot) + 1) for slot in
                 np.flatnonzero((hashes[1:] == hashes[:-1]) & (pools[1:] != pools[:-1]))]
        wanted: dict[str, set[int]] = {}
        for i in (i for pair in pairs for i in pair):
            wanted.setdefault(names[pools[i]], set()).add(int(lines[i]))
        paths = {name: self.root / EVAL_ROWS_BY_NAME[name].local_pool_file() for name in wanted}
        dids = {name: _values_at(paths[name], wanted[name], "did") for name in wanted}
        for first, later in pairs:
            (first_pool, first_line), (pool, line) = [(names[pools[i]], int(lines[i])) for i in (first, later)]
            did = dids[pool][line]
            if dids[first_pool][first_line] == did:
                self.report.add(DataError(
                    f"did '{did}' is also in the local pool of {first_pool} (line {first_line}): local pools must "
                    "not share dids, the global pool is their union", str(paths[pool]), line, "did"))

    def check_instructions(self) -> None:
        path = self._file(QUERY_INSTRUCTIONS, required=True)
        if path is not None:
            self.instructions = read_instruction_rows(path, self.report)
            self.report.counts["instruction rows"] = len(self.instructions)

    def check_pool(self, rel: str, *, row: EvalRow | None = None, required: bool) -> _Ids | None:
        path = self._file(rel, required)
        if path is None:
            return None
        ids = _Ids()
        for line, cand in self._records(path, parse_candidate):
            ids.add(cand["did"], line)
            if "image" in cand["modality"].split(","):
                self.images.check(cand["img_path"], str(path), line, "img_path")
            if row is not None and cand["modality"] != TASKS[row.task_id][1]:
                self.report.add(DataError(f"a {cand['modality']} candidate in the pool of {row.name} "
                                          f"({TASKS[row.task_id][1]} candidates)", str(path), line, "modality"))
        self._report_empty(path, ids, "candidates")
        self._report_duplicates(path, ids, "did")
        if row is not None:
            self.report.row_counts[(row.name, "pool")] = len(ids.lines)
        else:
            self.report.counts[rel] = len(ids.lines)
        return ids

    def _check_positive(self, did: str, row: EvalRow, split: str, known: np.ndarray, file: str, line: int,
                        field: str) -> None:
        """A val/test positive: in a pool of the split, and in one its row can find it in."""
        if not _contains(known, did):
            self.report.add(DataError(f"did '{did}' is in no {split} candidate pool", file, line, field))
            return
        allowed = [other for other in positive_pool_rows(row) if other.name in self.local] if split != "train" else []
        if allowed and not any(_contains(self.local[other.name], did) for other in allowed):
            pools = " or ".join(other.name for other in allowed)
            self.report.add(DataError(
                f"positive '{did}' is in another row's pool, not in the local pool of {pools}: it could never be "
                "retrieved there (only OVEN/InfoSeek positives may sit in each other's pool of the same task)",
                file, line, field))

    def check_queries(self, rel: str, split: str, known: np.ndarray | None, *, dataset: str | None = None,
                      row: EvalRow | None = None, unique: bool = True) -> _Ids | None:
        path = self._file(rel, required=True)
        if path is None:
            return None
        file, ids, tasks = str(path), _Ids(), Counter()
        if known is None:
            self.report.add(DataError(f"no {split} candidate pool to resolve the dids of these queries", file))
        for line, query in self._records(path, parse_query):
            ids.add(query["qid"], line)
            tasks[query["task_id"]] += 1
            dataset_id = int(query["qid"].split(":", 1)[0])
            expected = row.dataset if row else dataset
            if expected and DATASETS[dataset_id] != expected:
                self.report.add(DataError(f"a {DATASETS[dataset_id]} query in the {expected} file", file, line, "qid"))
            if row and query["task_id"] != row.task_id:
                self.report.add(DataError(f"task {query['task_id']} in the file of {row.name}", file, line, "task_id"))
            self._check_instruction(dataset_id, query["task_id"], file, line)
            for field in ("pos_cand_list", "neg_cand_list"):
                for did in query[field] if known is not None else ():
                    if row is not None and field == "pos_cand_list":
                        self._check_positive(did, row, split, known, file, line, field)
                    elif not _contains(known, did):
                        self.report.add(DataError(f"did '{did}' is in no {split} candidate pool", file, line, field))
            if "image" in query["query_modality"].split(","):
                self.images.check(query["query_img_path"], file, line, "query_img_path")
        self._report_empty(path, ids, "queries")
        if unique:
            self._report_duplicates(path, ids, "qid")
        if row is not None:
            self.report.row_counts[(row.name, split)] = len(ids.lines)
        elif dataset is not None:
            for eval_row in EVAL_ROWS:
                if eval_row.dataset == dataset:
                    self.report.row_counts[(eval_row.name, "train")] = tasks[eval_row.task_id]
        else:
            self.report.counts[rel] = len(ids.lines)
        return ids

    def _check_instruction(self, dataset_id: int, task_id: int, file: str, line: int) -> None:
        key = (dataset_id, *TASKS[task_id])
        if self.instructions is None or key in self.instructions or key in self.missing_instructions:
            return
        self.missing_instructions.add(key)
        self.report.add(DataError(f"{QUERY_INSTRUCTIONS} has no instruction for dataset {dataset_id} "
                                  f"({DATASETS[dataset_id]}), {key[1]} -> {key[2]}", file, line, "task_id"))

    def check_qrels(self, row: EvalRow, split: str, known: np.ndarray | None, qids: _Ids | None) -> None:
        """The rules of `check_row_qrels` (what evaluation refuses), for every line at once."""
        path = self._file(row.qrels_file(split), required=True)
        if path is None:
            return
        file, count, scored, judged = str(path), 0, set(), {}
        query_hashes = qids.sorted_hashes() if qids is not None else None
        for line, qid, did, relevance, task_id in read_qrels_lines(path, self.report):
            count += 1
            if task_id != row.task_id:
                self.report.add(DataError(f"task {task_id} in the qrels of {row.name}", file, line, "task_id (column 5)"))
            if relevance <= 0:
                judged.setdefault(stable_hash64(qid), line)
                continue
            scored.add(stable_hash64(qid))
            if query_hashes is not None and not _contains(query_hashes, qid):
                self.report.add(DataError(f"qid '{qid}' is not in {row.query_file(split)}", file, line, "qid (column 1)"))
            if known is not None:
                self._check_positive(did, row, split, known, file, line, "did (column 3)")
        if qids is not None:
            self._report_unscored(row, split, qids, scored, judged, file)
        if split == "test":
            self.report.row_counts[(row.name, "qrels")] = count

    def _report_unscored(self, row: EvalRow, split: str, qids: _Ids, scored: set[int], judged: dict[int, int],
                         qrels_file: str) -> None:
        """Queries without a qrels line of relevance > 0: they could only ever score 0."""
        lines = {line: key for key, line in zip(qids.hashes, qids.lines) if key not in scored}
        if not lines:
            return
        query_file = self.root / row.query_file(split)
        for line, qid in sorted(_values_at(query_file, set(lines), "qid").items()):
            self.report.add(no_positive_error(qid, str(query_file), line, qrels_file, judged.get(lines[line])))


def _values_at(path: Path, lines: set[int], field: str) -> dict[int, str]:
    """`field` of the JSON records at these lines of `path`."""
    found = {}
    for line, raw in read_lines(path, False):
        if line in lines:
            found[line] = parse_json_object(raw, str(path), line)[field]
    return found


def _check_sources(data_dir: Path, report: Report, images: ImageCheck, symlinks_outside_root: bool) -> None:
    """nli_for_simcse.csv and cc3m/*.json[l] beside M-BEIR/, read with the training readers."""
    with tempfile.TemporaryDirectory(prefix="umarvel-validate-") as cache:
        nli = data_dir / "nli_for_simcse.csv"
        if nli.is_file():
            pairs = _read_source(lambda: NLIPairs(nli, cache_dir=cache, on_error="skip"), report)
            if pairs is not None:
                report.counts["nli_for_simcse.csv"] = len(pairs)
        image_root = data_dir / "cc3m" / "images"
        image_root = image_root if image_root.is_dir() else data_dir / "cc3m"
        for path in sorted((data_dir / "cc3m").glob("*.json*")):
            pairs = _read_source(lambda: CC3MPairs(path, image_root, cache_dir=cache, on_error="skip"), report)
            if pairs is None:
                continue
            report.counts[f"cc3m/{path.name}"] = len(pairs)
            checker = _ImageChecker(image_root, images, report, symlinks_outside_root)
            for row in pairs.table.rows():
                checker.check(row["image"], str(path), row["line"], pairs.image_field)


def _read_source(read, report: Report):
    try:
        pairs = read()
    except DataError as err:
        report.add(err)
        return None
    for err in pairs.errors:
        report.add(err)
    if pairs.table.skipped > len(pairs.errors):
        report.add(DataError(f"... and {pairs.table.skipped - len(pairs.errors)} more bad rows", str(pairs.table.source)))
    return pairs


def validate(path: str | Path, *, images: ImageCheck = "open", progress: bool | None = None,
             emit: Callable[[DataError], None] | None = None, symlinks_outside_root: bool = False) -> Report:
    """Validate an M-BEIR root, or a data directory holding M-BEIR/ (+ NLI and CC3M files).
    `symlinks_outside_root`: accept image symlinks that lead out of the root (see resolve_under)."""
    path = Path(path)
    report = Report(emit)
    if not path.is_dir():
        report.add(DataError("directory not found", str(path)))
        return report
    root = mbeir_root(path)
    MBEIRValidator(root, images, report, progress, symlinks_outside_root).run()
    if root != path:
        _check_sources(path, report, images, symlinks_outside_root)
    return report
