"""Corrupted M-BEIR trees: every class of damage ends in a clear error naming file and line, in
`umarvel data validate` and where evaluation and training read the data, or is handled as the
M-BEIR protocol says (with the number asserted). Never a traceback, never a silently changed
recall.

16 classes, in 17 rows of the CORRUPTIONS table (the symlink class twice): a positive in
another row's pool; an OVEN/InfoSeek positive in the other one's pool (handled: a miss locally,
a hit globally); a query task_id that disagrees with its row; a qrels did in no pool; a query of
another dataset; a text candidate in an image pool; a truncated JPEG; a query without a qrels
line; a query whose only line has relevance 0; a did in two local pools; an image symlinked out
of the data root (refused, and accepted with the opt-in); non-UTF-8 bytes in the qrels; non-UTF-8
bytes in the instructions TSV; an empty query file; an empty pool file; an empty training query
file. Beside the tree, empty NLI and CC3M files (the pre-training sources) are named too.

The clean tree (built once per module, copied per case): every row has 10 candidates and 4
queries in a vocabulary of its own, so the keyword embedder ranks exactly; query 0 finds its
positive first and the others rank theirs 8th to 10th: R@5 = 25 on every R@5 row.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from mini_mbeir import KeywordEmbedder, query, write_jsonl, write_mini_mbeir
from umarvel import backbones
from umarvel.cli import main
from umarvel.config import EncodeConfig, MBEIREvalConfig, PromptConfig, load_config
from umarvel.data.collator import load_image
from umarvel.data.mbeir import resolve_under
from umarvel.data.tasks import EVAL_ROWS, EVAL_ROWS_BY_NAME, GLOBAL_POOL, QUERY_INSTRUCTIONS, UNION_TRAIN_QUERIES
from umarvel.data.validate import validate
from umarvel.errors import DataError
from umarvel.evaluation.mbeir import MBEIREvaluator
from umarvel.training.stages import build_pairs

CANDIDATES, QUERIES = 10, 4
POSITIVE_OF = {0: 0, 1: 9, 2: 8, 3: 7}  # query j -> its positive candidate


def word(position: int, item: int) -> str:
    """Row `position`'s keyword number `item`: letters only, unique across rows."""
    n = position * CANDIDATES + item
    return "k" + chr(97 + n // 26) + chr(97 + n % 26)


KEYWORDS = [word(p, i) for p in range(len(EVAL_ROWS)) for i in range(CANDIDATES)]


def did(row_name: str, item: int) -> str:
    row = EVAL_ROWS_BY_NAME[row_name]
    return f"{row.dataset_id}:{1000 * row.task_id + item}"


def qid(row_name: str, j: int) -> str:
    row = EVAL_ROWS_BY_NAME[row_name]
    return f"{row.dataset_id}:{1000 * row.task_id + 100 + j}"


def candidate(root: Path, position: int, item: int) -> dict:
    row = EVAL_ROWS[position]
    modality = row.modalities[1]
    image = None
    if "image" in modality:
        image = f"mbeir_images/{row.dataset}_images/{row.name}_c{item}.jpg"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        pixels = random.Random(f"{row.name}:{item}").randbytes(48 * 48 * 3)  # noise: most bytes are scan data
        Image.frombytes("RGB", (48, 48), pixels).save(root / image, quality=95)
    return {"txt": word(position, item) if "text" in modality else None, "img_path": image, "modality": modality,
            "did": did(row.name, item), "src_content": None}


def build_tree(root: Path) -> Path:
    pools = {row.name: [candidate(root, p, i) for i in range(CANDIDATES)] for p, row in enumerate(EVAL_ROWS)}
    queries = {row.name: [query(row.name, qid(row.name, j), word(p, j), [did(row.name, POSITIVE_OF[j])])
                          for j in range(QUERIES)] for p, row in enumerate(EVAL_ROWS)}
    write_mini_mbeir(root, queries, pools)
    write_jsonl(root / GLOBAL_POOL.format(split="train"), [c for pool in pools.values() for c in pool])
    train = [{**q, "qid": q["qid"].replace(":", ":5")} for records in queries.values() for q in records]
    write_jsonl(root / UNION_TRAIN_QUERIES, train)
    return root


# ---- the files a corruption edits -------------------------------------------------------

def pool_file(row: str) -> str:
    return EVAL_ROWS_BY_NAME[row].local_pool_file()


def query_file(row: str) -> str:
    return EVAL_ROWS_BY_NAME[row].query_file("test")


def qrels_file(row: str) -> str:
    return EVAL_ROWS_BY_NAME[row].qrels_file("test")


def lines_of(root: Path, rel: str) -> list[str]:
    return (root / rel).read_text().splitlines()


def write_lines(root: Path, rel: str, lines: list[str]) -> None:
    (root / rel).write_text("".join(line + "\n" for line in lines))


def move_line(root: Path, rel: str, number: int, to: str) -> None:
    """Move 1-based line `number` of `rel` to the end of `to`."""
    lines = lines_of(root, rel)
    moved = lines.pop(number - 1)
    write_lines(root, rel, lines)
    write_lines(root, to, lines_of(root, to) + [moved])


def edit_line(root: Path, rel: str, number: int, edit: Callable[[str], str]) -> None:
    lines = lines_of(root, rel)
    lines[number - 1] = edit(lines[number - 1])
    write_lines(root, rel, lines)


def insert_bytes(root: Path, rel: str, number: int, junk: bytes) -> None:
    raw = (root / rel).read_bytes().split(b"\n")
    raw[number - 1] += junk
    (root / rel).write_bytes(b"\n".join(raw))


def image_of(root: Path, row: str, line: int) -> Path:
    import json

    return root / json.loads(lines_of(root, pool_file(row))[line - 1])["img_path"]


def truncate_jpeg(root: Path) -> None:
    """Cut inside the scan data: headers whole, so `Image.verify` passes it."""
    path = image_of(root, "visualnews_task0", 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 7 // 10])


def symlink_out_of_root(root: Path) -> None:
    path = image_of(root, "nights_task4", 1)
    outside = root.parent / "elsewhere" / path.name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(path, outside)
    path.symlink_to(outside)


# ---- the table --------------------------------------------------------------------------

@dataclass(frozen=True)
class Where:
    """The error a reader must raise: file (relative to the root), line, and a phrase of it."""

    file: str
    line: int | None
    phrase: str


@dataclass(frozen=True)
class Corruption:
    name: str
    damage: Callable[[Path], None]
    validate: Where | None  # None: the tree validates clean
    eval_row: str | None = None  # the row evaluated ('global': webqa_task1 on both pools); None: eval reads nothing damaged
    evaluation: Where | dict | None = None  # an error, or {pool: R@5} when handled
    training: Where | None = None  # None: the union train files the stage reads are whole
    image_read: str | None = None  # an image the collator must refuse, naming it
    settings: dict = field(default_factory=dict)


RELEVANCE_ZERO = lambda line: " ".join(cell if i != 3 else "0" for i, cell in enumerate(line.split()))  # noqa: E731

CORRUPTIONS = [
    Corruption("positive in another row's pool",
               lambda r: move_line(r, pool_file("webqa_task1"), 1, pool_file("visualnews_task3")),
               Where(qrels_file("webqa_task1"), 1, "is in another row's pool"),
               "webqa_task1", Where(qrels_file("webqa_task1"), 1, "is not in")),
    Corruption("OVEN/InfoSeek positive in the other one's pool (handled)",
               lambda r: move_line(r, pool_file("infoseek_task6"), 1, pool_file("oven_task6")),
               None, "infoseek_task6", {"local": 0.0, "global": 25.0}),
    Corruption("task_id disagrees with the row",
               lambda r: edit_line(r, query_file("webqa_task1"), 2, lambda s: s.replace('"task_id": 1', '"task_id": 2')),
               Where(query_file("webqa_task1"), 2, "task 2 in the file of webqa_task1"),
               "webqa_task1", Where(query_file("webqa_task1"), 2, "task 2 in the file of webqa_task1")),
    Corruption("qrels did in no pool",
               lambda r: edit_line(r, qrels_file("webqa_task1"), 1, lambda s: s.replace(did("webqa_task1", 0), "2:99999")),
               Where(qrels_file("webqa_task1"), 1, "is in no test candidate pool"),
               "webqa_task1", Where(qrels_file("webqa_task1"), 1, "'2:99999' is not in")),
    Corruption("query of another dataset",
               lambda r: [edit_line(r, rel, 3, lambda s: s.replace(qid("webqa_task1", 2), "9:7777"))
                          for rel in (query_file("webqa_task1"), qrels_file("webqa_task1"))],
               Where(query_file("webqa_task1"), 3, "a mscoco query in the webqa file"),
               "webqa_task1", Where(query_file("webqa_task1"), 3, "a mscoco query in the webqa file")),
    Corruption("text candidate in an image pool",
               lambda r: edit_line(r, pool_file("mscoco_task0"), 2, lambda s: s.replace('"modality": "image"',
                                                                                      '"modality": "text"').replace(
                   '"txt": null', '"txt": "a caption"')),
               Where(pool_file("mscoco_task0"), 2, "a text candidate in the pool of mscoco_task0"),
               "mscoco_task0", Where(pool_file("mscoco_task0"), 2, "a text candidate in the pool of mscoco_task0")),
    Corruption("truncated JPEG", truncate_jpeg,
               Where(pool_file("visualnews_task0"), 2, "cannot be read by PIL"),
               image_read="mbeir_images/visualnews_images/visualnews_task0_c1.jpg"),
    Corruption("query without a qrels line",
               lambda r: write_lines(r, qrels_file("webqa_task1"), lines_of(r, qrels_file("webqa_task1"))[:1] +
                                     lines_of(r, qrels_file("webqa_task1"))[2:]),
               Where(query_file("webqa_task1"), 2, "has no line with relevance > 0"),
               "webqa_task1", Where(query_file("webqa_task1"), 2, "has no line with relevance > 0")),
    Corruption("query whose only qrels line has relevance 0",
               lambda r: edit_line(r, qrels_file("webqa_task1"), 2, RELEVANCE_ZERO),
               Where(qrels_file("webqa_task1"), 2, "has no line with relevance > 0, only this one"),
               "webqa_task1", Where(qrels_file("webqa_task1"), 2, "has no line with relevance > 0, only this one")),
    Corruption("did in two local pools",
               lambda r: write_lines(r, pool_file("visualnews_task3"), lines_of(r, pool_file("visualnews_task3")) +
                                     lines_of(r, pool_file("webqa_task1"))[:1]),
               Where(pool_file("visualnews_task3"), CANDIDATES + 1, "is also in the local pool of webqa_task1"),
               "global", Where(pool_file("visualnews_task3"), CANDIDATES + 1, "is also in")),
    Corruption("image symlinked out of the root", symlink_out_of_root,
               Where(pool_file("nights_task4"), 1, "is a symlink to"),
               "nights_task4", Where(pool_file("nights_task4"), 1, "data.allow_symlinks_outside_root"),
               training=Where(GLOBAL_POOL.format(split="train"), 9 * CANDIDATES + 1, "is a symlink to")),
    Corruption("image symlinked out of the root, opted in (handled)", symlink_out_of_root,
               None, "nights_task4", {"local": 25.0}, settings={"symlinks_outside_root": True}),
    Corruption("non-UTF-8 bytes in the qrels",
               lambda r: insert_bytes(r, qrels_file("webqa_task1"), 3, b" \xff\xfe"),
               Where(qrels_file("webqa_task1"), 3, "not UTF-8"),
               "webqa_task1", Where(qrels_file("webqa_task1"), 3, "not UTF-8")),
    Corruption("non-UTF-8 bytes in the instructions",
               lambda r: insert_bytes(r, QUERY_INSTRUCTIONS, 5, b"\xe9t\xe9"),
               Where(QUERY_INSTRUCTIONS, 5, "not UTF-8"),
               "webqa_task1", Where(QUERY_INSTRUCTIONS, 5, "not UTF-8"),
               training=Where(QUERY_INSTRUCTIONS, 5, "not UTF-8")),
    Corruption("empty query file",
               lambda r: write_lines(r, query_file("webqa_task1"), []),
               Where(query_file("webqa_task1"), None, "no queries"),
               "webqa_task1", Where(query_file("webqa_task1"), None, "no queries (the file is empty)")),
    Corruption("empty pool file",
               lambda r: [write_lines(r, rel, []) for rel in (pool_file("webqa_task1"), GLOBAL_POOL.format(split="train"))],
               Where(pool_file("webqa_task1"), None, "no candidates"),
               "webqa_task1", Where(pool_file("webqa_task1"), None, "no candidates (the file is empty)"),
               training=Where(GLOBAL_POOL.format(split="train"), None, "no candidates (the file is empty)")),
    Corruption("empty training query file",
               lambda r: write_lines(r, UNION_TRAIN_QUERIES, []),
               Where(UNION_TRAIN_QUERIES, None, "no queries"),
               training=Where(UNION_TRAIN_QUERIES, None, "no queries (the file is empty)")),
]


# ---- fixtures and the three readers -----------------------------------------------------

@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> Path:
    return build_tree(tmp_path_factory.mktemp("clean") / "M-BEIR")


@pytest.fixture(autouse=True)
def table_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UMARVEL_CACHE", str(tmp_path / "umarvel-cache"))


def cases(applies: Callable[[Corruption], object]):
    """Parametrise over the corruptions a reader is concerned with (each test copies and damages the tree)."""
    chosen = [c for c in CORRUPTIONS if applies(c)]
    return pytest.mark.parametrize("damaged", chosen, ids=[c.name for c in chosen], indirect=True)


@pytest.fixture
def damaged(request, clean_tree, tmp_path) -> tuple[Corruption, Path]:
    root = tmp_path / "M-BEIR"
    shutil.copytree(clean_tree, root, symlinks=True)
    request.param.damage(root)
    return request.param, root


def evaluate(root: Path, tmp: Path, row: str, **settings) -> dict[str, float]:
    """R@5 of `row` per pool (`row` 'global': the global pool of webqa_task1)."""
    pools = ("local", "global") if row in ("global", "infoseek_task6") else ("local",)
    name = "webqa_task1" if row == "global" else row
    evaluator = MBEIREvaluator(KeywordEmbedder(KEYWORDS, tmp), root,
                               EncodeConfig(cache_dir=str(tmp / "emb")), MBEIREvalConfig(rows=[name]), progress=False,
                               **settings)
    results = evaluator.evaluate([EVAL_ROWS_BY_NAME[name]], pools, tmp / "out")
    return {pool: rows[0].recall[5] for pool, rows in results.items()}


def train_pairs(root: Path, *overrides: str) -> None:
    """Build the stage's training pairs and read every sample, as the trainer's loader does."""
    pairs = build_pairs(load_config(None, [f"data.path={root}", "model.prompt.use_instruction=true", *overrides]))
    for index in range(len(pairs)):
        pairs[index]


def assert_names(err: DataError, root: Path, where: Where) -> None:
    assert err.file == str(root / where.file), str(err)
    assert err.line == where.line, str(err)
    assert where.phrase in str(err), str(err)


# ---- the tests --------------------------------------------------------------------------

def test_the_clean_tree_validates_and_scores_as_designed(clean_tree, tmp_path):
    report = validate(clean_tree)
    assert report.ok, "\n".join(map(str, report.errors))
    assert evaluate(clean_tree, tmp_path, "infoseek_task6") == {"local": 25.0, "global": 25.0}
    assert evaluate(clean_tree, tmp_path, "webqa_task1") == {"local": 25.0}
    train_pairs(clean_tree)


@cases(lambda c: True)
def test_validate_names_file_and_line(damaged):
    corruption, root = damaged
    errors = validate(root, **corruption.settings).errors
    if corruption.validate is None:
        assert not errors, "\n".join(map(str, errors))
        return
    expected = corruption.validate
    found = [e for e in errors if e.file == str(root / expected.file) and e.line == expected.line]
    assert found, f"not reported at {expected}; got:\n" + "\n".join(map(str, errors))
    assert any(expected.phrase in str(e) for e in found), "\n".join(map(str, found))


@cases(lambda c: c.eval_row)
def test_evaluation_refuses_or_scores_correctly(damaged, tmp_path):
    corruption, root = damaged
    if isinstance(corruption.evaluation, dict):
        assert evaluate(root, tmp_path, corruption.eval_row, **corruption.settings) == corruption.evaluation
        return
    with pytest.raises(DataError) as caught:
        evaluate(root, tmp_path, corruption.eval_row, **corruption.settings)
    assert_names(caught.value, root, corruption.evaluation)


@cases(lambda c: c.training)
def test_training_refuses_with_file_and_line(damaged):
    corruption, root = damaged
    with pytest.raises(DataError) as caught:
        train_pairs(root)
    assert_names(caught.value, root, corruption.training)


@cases(lambda c: c.image_read)
def test_image_reader_refuses_what_validate_decodes(damaged):
    corruption, root = damaged
    with pytest.raises(DataError) as caught:
        load_image(str(root / corruption.image_read), PromptConfig(), backbones.get(backbones.DEFAULT))
    assert caught.value.file == str(root / corruption.image_read)


def test_the_cli_refuses_an_outside_symlink_unless_opted_in(clean_tree, tmp_path, capsys):
    root = tmp_path / "M-BEIR"
    shutil.copytree(clean_tree, root)
    symlink_out_of_root(root)
    assert main(["data", "validate", "--data", str(root), "--images", "exists"]) == 1
    assert "data.allow_symlinks_outside_root=true" in capsys.readouterr().err
    assert main(["data", "validate", "--data", str(root), "--allow-symlinks-outside-root"]) == 0


def test_training_reads_outside_symlinks_when_opted_in(clean_tree, tmp_path):
    root = tmp_path / "M-BEIR"
    shutil.copytree(clean_tree, root)
    symlink_out_of_root(root)
    train_pairs(root, "data.allow_symlinks_outside_root=true")


def test_a_linked_image_directory_is_resolved_like_a_linked_file(tmp_path):
    """mbeir_images/ linked from another disk: refused unless opted in; a link that stays inside the root is fine."""
    root, disk = tmp_path / "root", tmp_path / "disk"
    (disk / "x").mkdir(parents=True)
    (disk / "x" / "a.jpg").write_bytes(b"")
    root.mkdir()
    (root / "mbeir_images").symlink_to(disk)
    (root / "inside").symlink_to(root / "mbeir_images" / "x", target_is_directory=True)
    (root / "own").mkdir()
    (root / "own" / "b.jpg").write_bytes(b"")
    (root / "again").symlink_to(root / "own")
    with pytest.raises(DataError, match="is a symlink to .*disk"):
        resolve_under(root, "mbeir_images/x/a.jpg")
    with pytest.raises(DataError, match="data.allow_symlinks_outside_root"):
        resolve_under(root, "inside/a.jpg")
    assert resolve_under(root, "mbeir_images/x/a.jpg", symlinks_outside_root=True) == str(root / "mbeir_images/x/a.jpg")
    assert resolve_under(root, "again/b.jpg") == str(root / "again" / "b.jpg")


@pytest.mark.parametrize("source, name, text", [("nli", "nli_for_simcse.csv", "sent0,sent1,hard_neg\n"),
                                                ("cc3m", "pairs.jsonl", "")])
def test_an_empty_pretraining_file_is_named(source, name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        build_pairs(load_config(None, [f"data.source={source}", f"data.path={path}"]))
    assert caught.value.file == str(path) and "(the file is empty)" in str(caught.value)
