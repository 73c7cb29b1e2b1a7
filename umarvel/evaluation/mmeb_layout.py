"""Read MMEB as TIGER-Lab publishes it (the layout VLM2Vec's evaluation reads).

    DIR/MMEB-eval/README.md              YAML header: configs -> config_name, data_files (split test, path)
    DIR/MMEB-eval/<Subset>/test-*.parquet one row per query
    DIR/eval_images/<path>               the images rows name (images.zip unpacked)

A row is a query and its own candidates, the positive at index 0. Two column sets are read:
V1 (MMEB-eval) `qry_text, qry_img_path, tgt_text, tgt_img_path`, the instructions inline in the
text; V2's image tasks (MMEB_Test_Instruct) add `qry_inst` and `tgt_inst`. An empty image path
means no image.

`<|image_1|>` is the image placeholder of the model family VLM2Vec started from (Phi-3-V): it is
dropped, and the row's image goes in the item's `image`, which our prompt lays out for its own
family. The instruction is split off into the item's `instruction` (left out of the pool with
model.mask_instruction), by `split_instruction` for V1 and by the `*_inst` columns for V2.

Every check names the file, the row and the column, and every image path resolves under
`eval_images/` by M-BEIR's rule (`resolve_under`: no escapes, symlinks out of the root only with
data.allow_symlinks_outside_root).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from umarvel.data.files import read_utf8, resolve_under
from umarvel.errors import DataError

META_DIR = "MMEB-eval"
IMAGE_DIR = "eval_images"
PLACEHOLDER = "<|image_1|>"
SPLIT = "test"
V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
V2_COLUMNS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")
LAYOUT_HELP = "see README (MMEB) for the layout"
# An instruction ends at the first colon or full stop followed by white space
# ("...the following question: What ...", "...follows the language expressions. man in blue").
_INSTRUCTION_END = re.compile(r"[:.]\s")


def split_instruction(text: str, query: bool) -> tuple[str, str]:
    """(instruction, content) of a V1 text, its image placeholder removed.

    Queries, and candidates whose text carries the placeholder, are instructed: their
    instruction runs up to and including the first colon or full stop followed by white space
    ("Represent the given image with the following question:" / "What is ..."). Without one, a
    text with the placeholder is all instruction (its content is the image: "Represent the given
    image for classification.") and a query without it is all content. Other candidates are
    content only (a class label, an answer, a caption has colons and sentences of its own)."""
    marked = PLACEHOLDER in text
    stripped = text.replace(PLACEHOLDER, "").strip()
    match = _INSTRUCTION_END.search(stripped) if (query or marked) else None
    if match and match.start() > 0:
        return stripped[:match.start() + 1], stripped[match.end():].strip()
    return (stripped, "") if marked else ("", stripped)


@dataclass
class Subset:
    """One subset's rows: per row a query item and its candidates' keys (positive first)."""

    name: str
    layout: str
    files: list[Path]
    queries: list[dict] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    candidates: dict[str, dict] = field(default_factory=dict)
    query_images: list[str] = field(default_factory=list)
    candidate_images: list[str] = field(default_factory=list)


def read_readme(root: Path) -> dict[str, list[str]]:
    """config_name -> its test split's path patterns, from the README's YAML header."""
    path = root / META_DIR / "README.md"
    if not path.is_file():
        raise DataError(f"not found: the MMEB data directory holds {META_DIR}/README.md and {META_DIR}/<Subset>/ "
                        f"beside {IMAGE_DIR}/ ({LAYOUT_HELP})", file=str(path))
    lines = read_utf8(path).splitlines()
    if not lines or lines[0].strip() != "---" or "---" not in (line.strip() for line in lines[1:]):
        raise DataError("no YAML header (a block between two '---' lines at the top, listing the configs)",
                        file=str(path), line=1)
    end = 1 + [line.strip() for line in lines[1:]].index("---")
    try:
        header = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(f"YAML header does not parse: {getattr(err, 'problem', None) or err}", file=str(path),
                        line=mark.line + 2 if mark else None) from None
    configs = header.get("configs") if isinstance(header, dict) else None
    if not isinstance(configs, list) or not configs:
        raise DataError("the YAML header lists no configs (configs: - config_name: ... data_files: ...)",
                        file=str(path), field="configs")
    out: dict[str, list[str]] = {}
    for number, config in enumerate(configs):
        name = config.get("config_name") if isinstance(config, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"config {number} has no config_name", file=str(path), field="configs")
        out[name] = _test_paths(config.get("data_files"), name, path)
    return out


def _test_paths(data_files, name: str, readme: Path) -> list[str]:
    """The path patterns of the test split: data_files as the dataset card lists them, entries of
    {split, path} (a bare pattern would be Hugging Face's train split, so it is not taken as test)."""
    for entry in data_files if isinstance(data_files, list) else []:
        if isinstance(entry, dict) and entry.get("split") == SPLIT:
            patterns = entry.get("path")
            patterns = [patterns] if isinstance(patterns, str) else patterns
            if isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns):
                return patterns
    raise DataError(f"config {name}: data_files names no '{SPLIT}' split path (entries of split: {SPLIT}, path: ...)",
                    file=str(readme), field="data_files")


def subset_files(root: Path, name: str, patterns: list[str]) -> list[Path]:
    """The parquet files a config's patterns match, all inside MMEB-eval/."""
    base = (root / META_DIR).resolve()
    readme = root / META_DIR / "README.md"
    files: list[Path] = []
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            raise DataError(f"config {name}: path '{pattern}' leaves {META_DIR}/", file=str(readme), field="data_files")
        matched = sorted(Path(p) for p in glob.glob(str(root / META_DIR / pattern)))
        outside = [p for p in matched if not p.resolve().is_relative_to(base)]
        if outside:
            raise DataError(f"config {name}: {outside[0]} resolves outside {base}", file=str(readme), field="data_files")
        files += matched
    if not files:
        raise DataError(f"config {name}: no parquet file matches {patterns} under {root / META_DIR}",
                        file=str(readme), field="data_files")
    return files


def read_subset(root: Path, name: str, patterns: list[str], *, symlinks_outside_root: bool = False) -> Subset:
    """Read and check one subset; a bad file, row, column or image is a DataError naming it."""
    files = subset_files(root, name, patterns)
    images = _ImageResolver(root / IMAGE_DIR, symlinks_outside_root)
    subset: Subset | None = None
    for path in files:
        columns = _read_columns(path)
        layout = "V2" if "qry_inst" in columns else "V1"
        if subset is None:
            subset = Subset(name, layout, files)
        elif layout != subset.layout:
            raise DataError(f"subset {name} mixes layouts: {files[0].name} is {subset.layout}, this file {layout}",
                            file=str(path))
        for row in range(len(columns["qry_text"])):
            _read_row(subset, columns, row, path, images)
    if subset is None or not subset.queries:
        raise DataError(f"subset {name} has no rows", file=str(files[0]))
    return subset


def _read_columns(path: Path) -> dict[str, list]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable parquet file: {err}", file=str(path)) from None
    names = table.column_names
    wanted = V2_COLUMNS if "qry_inst" in names or "tgt_inst" in names else V1_COLUMNS
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; has {', '.join(names) or 'none'} "
                        f"(V1: {', '.join(V1_COLUMNS)}; V2 adds qry_inst, tgt_inst)", file=str(path))
    return {c: table.column(c).to_pylist() for c in wanted}


def _cell(columns: dict, column: str, row: int, path: Path, kind: type):
    value = columns[column][row]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"row {row}: expected a list of strings, got {_describe(value)}", file=str(path),
                            field=column)
    elif not isinstance(value, str):
        raise DataError(f"row {row}: expected a string, got {_describe(value)}", file=str(path), field=column)
    return value


def _describe(value) -> str:
    return "null" if value is None else type(value).__name__ if not isinstance(value, list) else "a list with non-strings"


def _read_row(subset: Subset, columns: dict, row: int, path: Path, images: _ImageResolver) -> None:
    texts = _cell(columns, "tgt_text", row, path, list)
    paths = _cell(columns, "tgt_img_path", row, path, list)
    if len(texts) != len(paths):
        raise DataError(f"row {row}: tgt_text has {len(texts)} entries, tgt_img_path {len(paths)}; they pair up "
                        "index by index", file=str(path), field="tgt_img_path")
    if not texts:
        raise DataError(f"row {row}: no candidates: the positive is index 0 of tgt_text/tgt_img_path",
                        file=str(path), field="tgt_text")
    qry_text = _cell(columns, "qry_text", row, path, str)
    qry_image = _cell(columns, "qry_img_path", row, path, str)
    if subset.layout == "V2":
        instruction = _cell(columns, "qry_inst", row, path, str).replace(PLACEHOLDER, "").strip()
        content = qry_text.replace(PLACEHOLDER, "").strip()
        target_instruction = _cell(columns, "tgt_inst", row, path, str).replace(PLACEHOLDER, "").strip()
    else:
        instruction, content = split_instruction(qry_text, query=True)
        _check_marker(qry_text, qry_image, row, path, "qry_text")
        target_instruction = ""
    query = _item(str(len(subset.queries)), instruction, content, images.get(qry_image, path, row, "qry_img_path"))
    if "text" not in query and "image" not in query:
        raise DataError(f"row {row}: the query has neither text nor an image besides its instruction",
                        file=str(path), field="qry_text")
    keys = []
    for index, (text, image) in enumerate(zip(texts, paths)):
        if subset.layout == "V2":
            cand_instruction = target_instruction if image else ""
            cand_text = text.replace(PLACEHOLDER, "").strip()
        else:
            _check_marker(text, image, row, path, f"tgt_text[{index}]")
            cand_instruction, cand_text = split_instruction(text, query=False)
        item = _item("", cand_instruction, cand_text, images.get(image, path, row, f"tgt_img_path[{index}]"))
        if "text" not in item and "image" not in item:
            which = "the positive (index 0)" if index == 0 else f"candidate {index}"
            raise DataError(f"row {row}: {which} has neither text nor an image", file=str(path), field="tgt_text")
        key = repr((item.get("instruction"), item.get("text"), item.get("image")))
        if key not in subset.candidates:
            item["id"] = f"c{len(subset.candidates)}"
            subset.candidates[key] = item
            if image:
                subset.candidate_images.append(image)
        keys.append(subset.candidates[key]["id"])
    subset.queries.append(query)
    subset.query_images.append(qry_image)
    subset.rows.append(keys)


def _check_marker(text: str, image: str, row: int, path: Path, column: str) -> None:
    if PLACEHOLDER in text and not image:
        raise DataError(f"row {row}: the text has the image placeholder {PLACEHOLDER} but the row gives no image "
                        "path for it", file=str(path), field=column)


def _item(item_id: str, instruction: str, text: str, image: str | None) -> dict:
    item = {"id": item_id}
    if text:
        item["text"] = text
    if image:
        item["image"] = image
    if instruction:
        item["instruction"] = instruction
    return item


class _ImageResolver:
    """Image paths under eval_images/, each checked once (a classification subset names its
    1000 query images once, a retrieval subset its candidate images in every row)."""

    def __init__(self, root: Path, symlinks_outside_root: bool):
        self.root, self.symlinks_outside_root = root, symlinks_outside_root
        self.resolved: dict[str, str] = {}

    def get(self, relative: str, path: Path, row: int, column: str) -> str | None:
        if not relative:
            return None
        if relative not in self.resolved:
            try:
                self.resolved[relative] = resolve_under(self.root, relative,
                                                        symlinks_outside_root=self.symlinks_outside_root)
            except DataError as err:
                raise DataError(f"row {row}: {err.message}", file=str(path), field=column) from None
        return self.resolved[relative]
