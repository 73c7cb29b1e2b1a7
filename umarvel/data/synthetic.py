"""A small, learnable, M-BEIR-shaped benchmark rendered from a toy world of shapes.

Why: the real M-BEIR is 170 GB and cannot be fetched on CI or a laptop; the demo and the tests
need the exact on-disk layout (umarvel.data.tasks, shared/reference/mbeir-format.md) with
retrieval that a tiny model can actually learn. Every image is a 56x56 picture of coloured
shapes and every text describes one: captions ("two red circles on the left"), paraphrases
("at the left side there are a pair of red round shapes"), composed edits ("same but blue"),
entity names ("a striped red circle"). Pools contain near-misses that differ from a positive by
one attribute, so hard negatives exist. mscoco_task3 queries have two positives; a third of the
InfoSeek queries also have an OVEN positive, a hit only in the global pool (as in M-BEIR).

`write_synthetic(out, seed, size)` writes, byte-identical for the same seed:
  out/M-BEIR/...             queries (train per dataset, union train, val, test), local and
                             global pools, qrels, instructions/query_instructions.tsv, images
  out/nli_for_simcse.csv     sent0 = caption, sent1 = paraphrase, hard_neg = a near-miss caption
  out/cc3m/llava_cc3m.json   LLaVA-595K form {id: {"h5v", "instruct_ans"}}
  out/cc3m/pairs.jsonl       the same pairs as {"image", "caption"}
  out/cc3m/images/           their images (image root of both CC3M files)
The union train file is "upsampled" as the real one is: NIGHTS' train queries appear twice.
The val and test union pools are both the concatenation of the 16 local pools, which hold the
positives of the val and the test queries.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from umarvel.data.tasks import (
    DATASET_IDS, DATASETS, EVAL_ROWS, EVAL_ROWS_BY_NAME, GLOBAL_POOL, IMAGE_DIRS, IMAGES_ROOT, QUERY_INSTRUCTIONS, TASKS,
    UNION_TRAIN_QUERIES, EvalRow,
)
from umarvel.io import atomic_path, atomic_write_text

IMAGE_SIZE = 56

# queries per row (train, val, test), candidates per local pool, NLI rows, CC3M pairs
SIZES = {
    "tiny": {"train": 4, "val": 2, "test": 4, "pool": 14, "nli": 24, "cc3m": 12},
    "small": {"train": 24, "val": 8, "test": 24, "pool": 80, "nli": 300, "cc3m": 200},
    "medium": {"train": 150, "val": 20, "test": 60, "pool": 300, "nli": 2000, "cc3m": 1000},
}

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 170), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SHAPE_SYNONYM = {"circle": ("round shape", "round shapes"), "square": ("box", "boxes"),
                 "triangle": ("wedge", "wedges"), "star": ("spiky shape", "spiky shapes")}
COUNT_WORD = {1: "one", 2: "two", 3: "three"}
COUNT_PARAPHRASE = {1: "a single", 2: "a pair of", 3: "three"}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
POSITION_PARAPHRASE = {"left": "at the left side", "right": "at the right side", "top": "near the top",
                       "bottom": "near the bottom", "center": "in the middle"}
TEXTURES = ("plain", "striped", "dotted")
WORDS = ("park", "cafe", "zoo", "bank", "shop", "hotel")
BACKGROUND = (246, 246, 242)

# Which attributes vary in each dataset's pictures.
STYLE_OF = {
    "mscoco": "scene", "cirr": "scene", "nights": "scene",
    "visualnews": "news", "webqa": "news", "edis": "news",
    "fashion200k": "fashion", "fashioniq": "fashion",
    "oven": "entity", "infoseek": "entity",
}
STYLE_ATTRIBUTES = {
    "scene": ("shape", "colour", "count", "position"),
    "news": ("shape", "colour", "count", "position", "word"),
    "fashion": ("shape", "colour", "texture"),
    "entity": ("shape", "colour", "texture"),
}
COMPOSED_EDITS = {"fashioniq": ("colour", "texture"), "cirr": ("colour", "count", "position", "shape")}

INSTRUCTIONS = {
    0: ("Find a {domain} image that matches the given caption.", "Retrieve the {domain} picture this text describes.",
        "Show me a {domain} image of the following description.", "Identify the {domain} image that fits this caption."),
    1: ("Find a {domain} passage that says the same as the question.", "Retrieve {domain} text that restates this query.",
        "Give a {domain} paragraph with the same meaning.", "Identify the {domain} text that paraphrases this query."),
    2: ("Find a {domain} picture with text that matches the query.", "Retrieve a {domain} image and its text for this caption.",
        "Show a {domain} post with an image that fits the description.", "Identify the {domain} image with text described here."),
    3: ("Find a caption that describes this {domain} image.", "Retrieve the text that describes the {domain} picture.",
        "Write out a {domain} description for the image.", "Identify the caption of this {domain} image."),
    4: ("Find a {domain} image that looks like this one.", "Retrieve the most similar {domain} picture.",
        "Show a {domain} image that resembles the given one.", "Identify the {domain} image closest to this picture."),
    6: ("Answer the question about this {domain} image with a text.", "Retrieve the {domain} text that names the object shown.",
        "Find a {domain} description that answers the question.", "Identify the {domain} entry about the pictured object."),
    7: ("Find a {domain} image like this one with the change described.", "Retrieve the edited {domain} picture.",
        "Show the {domain} image after applying the requested change.", "Identify the {domain} image that matches the edit."),
    8: ("Find a {domain} image with text that answers the question.", "Retrieve the {domain} entry for the object shown.",
        "Show a {domain} card that names the pictured object.", "Identify the {domain} page about this object."),
}
DOMAIN = {"visualnews": "news", "fashion200k": "fashion", "webqa": "web", "edis": "news", "nights": "photo",
          "oven": "reference", "infoseek": "reference", "fashioniq": "fashion", "cirr": "photo",
          "mscoco": "common"}
ENTITY_QUESTIONS = {
    "oven": ("what is this object?", "name the object shown.", "which object is this?"),
    "infoseek": ("which object is in this picture?", "what is shown here?", "what do we see in the image?"),
}


# ---- the world ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Scene:
    """What a picture shows; `caption` and `paraphrase` describe exactly these attributes."""

    shape: str
    colour: str
    count: int = 1
    position: str = "center"
    texture: str = "plain"
    word: str | None = None
    style: str = "scene"

    def key(self) -> str:
        return f"{self.style}/{self.shape}/{self.colour}/{self.count}/{self.position}/{self.texture}/{self.word}"

    def _texture(self) -> str:
        return "" if self.texture == "plain" else f"{self.texture} "

    def caption(self) -> str:
        if self.style in ("fashion", "entity"):
            return f"a {self._texture()}{self.colour} {self.shape}"
        noun = self.shape if self.count == 1 else SHAPE_PLURAL[self.shape]
        text = f"{COUNT_WORD[self.count]} {self.colour} {noun} {POSITION_PHRASE[self.position]}"
        return f"{text} with the word {self.word}" if self.word else text

    def paraphrase(self) -> str:
        singular, plural = SHAPE_SYNONYM[self.shape]
        if self.style in ("fashion", "entity"):
            return f"a {self.colour} {self._texture()}{singular}"
        verb, noun = ("is", singular) if self.count == 1 else ("are", plural)
        text = f"{POSITION_PARAPHRASE[self.position]} there {verb} {COUNT_PARAPHRASE[self.count]} {self.colour} {noun}"
        return f"{text} and the text {self.word}" if self.word else text


def random_scene(style: str, rng: random.Random) -> Scene:
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    if style in ("fashion", "entity"):
        texture = rng.choice(TEXTURES)
        if style == "fashion":
            return Scene(shape, colour, texture=texture, style=style)
        return Scene(shape, colour, rng.randint(1, 3), rng.choice(POSITIONS), texture, style=style)
    positions = POSITIONS if style == "scene" else ("left", "right", "top", "center")
    word = rng.choice(WORDS) if style == "news" else None
    return Scene(shape, colour, rng.randint(1, 3), rng.choice(positions), word=word, style=style)


def change(scene: Scene, attribute: str, rng: random.Random) -> Scene:
    """The scene with `attribute` set to a different value: a near-miss or a composed edit."""
    options = {
        "shape": SHAPES, "colour": sorted(COLOURS), "count": (1, 2, 3), "texture": TEXTURES, "word": WORDS,
        "position": POSITIONS if scene.style != "news" else ("left", "right", "top", "center"),
    }[attribute]
    return replace(scene, **{attribute: rng.choice([v for v in options if v != getattr(scene, attribute)])})


def near_miss(scene: Scene, rng: random.Random) -> Scene:
    return change(scene, rng.choice(STYLE_ATTRIBUTES[scene.style]), rng)


def edit_text(attribute: str, scene: Scene) -> str:
    """The composed-query text that turns a reference picture into `scene`."""
    if attribute == "count":
        return f"same but with {COUNT_WORD[scene.count]}"
    if attribute == "position":
        return f"same but {POSITION_PHRASE[scene.position]}"
    if attribute == "shape":
        return f"same but {SHAPE_PLURAL[scene.shape]}"
    return f"same but {getattr(scene, attribute)}"


def entity_card(scene: Scene) -> Scene:
    """An encyclopedia-style picture of the entity (colour, shape, texture): one, centred."""
    return replace(scene, count=1, position="center")


# ---- rendering ----------------------------------------------------------------------------

def _regions(style: str) -> dict[str, tuple[int, int, int, int]]:
    bottom_edge = 42 if style == "news" else IMAGE_SIZE
    return {
        "left": (0, 0, 28, bottom_edge), "right": (28, 0, 56, bottom_edge), "top": (0, 0, 56, 28),
        "bottom": (0, 28, 56, 56), "center": (8, 8, 48, 48) if style != "news" else (8, 2, 48, 42),
    }


def _outline(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        cx, cy, outer = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        return [
            (cx + r * math.sin(math.pi * k / 5), cy - r * math.cos(math.pi * k / 5))
            for k, r in ((k, outer if k % 2 == 0 else outer * 0.45) for k in range(10))
        ]
    return None


def _draw_shape(canvas: Image.Image, shape: str, box, colour, texture: str) -> None:
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(shape, box)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon(outline, fill=255)
    fill = Image.new("RGB", canvas.size, colour)
    pattern = ImageDraw.Draw(fill)
    if texture == "striped":
        for y in range(0, IMAGE_SIZE, 4):
            pattern.line([(0, y), (IMAGE_SIZE, y)], fill=(255, 255, 255), width=1)
    elif texture == "dotted":
        for y in range(1, IMAGE_SIZE, 5):
            for x in range(1, IMAGE_SIZE, 5):
                pattern.rectangle((x, y, x + 1, y + 1), fill=(255, 255, 255))
    canvas.paste(fill, (0, 0), mask)


def render(scene: Scene, jitter_seed: str) -> Image.Image:
    """Draw the scene; `jitter_seed` moves objects by a pixel or two (NIGHTS' 'same picture')."""
    rng = random.Random(jitter_seed)
    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    x0, y0, x1, y1 = _regions(scene.style)[scene.position]
    horizontal = (x1 - x0) >= (y1 - y0)
    span = (x1 - x0) if horizontal else (y1 - y0)
    side = min((y1 - y0) if horizontal else (x1 - x0), span / scene.count) - 4
    for i in range(scene.count):
        centre_along = (x0 if horizontal else y0) + span * (i + 0.5) / scene.count
        centre_across = ((y0 + y1) if horizontal else (x0 + x1)) / 2
        cx, cy = (centre_along, centre_across) if horizontal else (centre_across, centre_along)
        cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
        half = side / 2 * rng.uniform(0.9, 1.0)
        _draw_shape(canvas, scene.shape, (cx - half, cy - half, cx + half, cy + half), COLOURS[scene.colour], scene.texture)
    if scene.word:
        ImageDraw.Draw(canvas).text((3, 43), scene.word, fill=(20, 20, 20), font=ImageFont.load_default(size=10))
    return canvas


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, subsampling=0)
    return buffer.getvalue()


# ---- the benchmark ------------------------------------------------------------------------

@dataclass(frozen=True)
class Content:
    """What a query or candidate shows: text, picture (with its jitter variant), or both."""

    modality: str
    text: str | None = None
    scene: Scene | None = None
    variant: int = 0

    def key(self, dataset: str) -> str:
        scene = self.scene.key() if self.scene else ""
        return f"{dataset}|{self.modality}|{self.text}|{scene}|{self.variant}"


@dataclass
class QuerySpec:
    text: str | None
    scene: Scene | None
    positives: list[Content]
    near_misses: list[Content]
    cross_positives: list[tuple[str, Content]] = field(default_factory=list)  # (dataset, content)


def _entity_content(dataset: str, task_id: int, entity: Scene) -> Content:
    if task_id == 6:
        text = entity.caption() if dataset == "oven" else f"this object is {entity.caption()}"
        return Content("text", text)
    text = entity.caption()[2:] if dataset == "oven" else f"object: {entity.caption()[2:]}"
    return Content("image,text", text, entity_card(entity))


def make_query(row: EvalRow, rng: random.Random) -> QuerySpec:
    """One query of `row`'s task with its positives and near-miss candidates."""
    style = STYLE_OF[row.dataset]
    scene = random_scene(style, rng)
    miss = near_miss(scene, rng)
    task = row.task_id
    if task == 0:
        return QuerySpec(scene.caption(), None, [Content("image", scene=scene)], [Content("image", scene=miss)])
    if task == 1:
        return QuerySpec(scene.caption(), None, [Content("text", scene.paraphrase())], [Content("text", miss.paraphrase())])
    if task == 2:
        def post(s: Scene) -> Content:
            return Content("image,text", s.paraphrase() if row.dataset == "webqa" else f"{s.word} news", s)
        return QuerySpec(scene.caption(), None, [post(scene)], [post(miss)])
    if task == 3:
        positives = [Content("text", scene.caption())]
        if row.dataset == "mscoco":
            positives.append(Content("text", scene.paraphrase()))
        return QuerySpec(None, scene, positives, [Content("text", miss.caption())])
    if task == 4:
        return QuerySpec(None, scene, [Content("image", scene=scene, variant=1)], [Content("image", scene=miss, variant=1)])
    if task == 7:
        attribute = rng.choice(COMPOSED_EDITS[row.dataset])
        target = change(scene, attribute, rng)
        other = change(target, rng.choice([a for a in STYLE_ATTRIBUTES[style] if a != attribute]), rng)
        return QuerySpec(edit_text(attribute, target), scene, [Content("image", scene=target)],
                         [Content("image", scene=scene), Content("image", scene=other)])
    question = rng.choice(ENTITY_QUESTIONS[row.dataset])
    spec = QuerySpec(question, scene, [_entity_content(row.dataset, task, scene)],
                     [_entity_content(row.dataset, task, miss)])
    if row.dataset == "infoseek" and rng.random() < 1 / 3:
        spec.cross_positives.append(("oven", _entity_content("oven", task, scene)))
    return spec


def random_candidate(row: EvalRow, rng: random.Random) -> Content:
    """A filler candidate of the row's candidate modality."""
    spec = make_query(row, rng)
    return rng.choice(spec.positives + spec.near_misses)


class _Pool:
    """Candidates of one (row, train|eval) pool; identical content gets one did."""

    def __init__(self):
        self.records: list[dict] = []
        self.did_of: dict[str, str] = {}


class _Builder:
    def __init__(self, out: Path, seed: int, size: str):
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
        self.root = out / "M-BEIR"
        self.out, self.sizes = out, SIZES[size]
        self.rng = random.Random(seed)
        self.next_index = {("q", d): 0 for d in DATASETS.values()} | {("c", d): 0 for d in DATASETS.values()}
        self.pools = {(group, row.name): _Pool() for group in ("train", "eval") for row in EVAL_ROWS}

    def _new_id(self, kind: str, dataset: str) -> tuple[str, int]:
        index = self.next_index[(kind, dataset)]
        self.next_index[(kind, dataset)] = index + 1
        return f"{DATASET_IDS[dataset]}:{index}", index

    def _image(self, dataset: str, group: str, name: str, scene: Scene, jitter_seed: str) -> str:
        rel = f"{IMAGES_ROOT}/{IMAGE_DIRS[dataset]}/{group}/{name}.jpg"
        _write_bytes(self.root / rel, _jpeg_bytes(render(scene, jitter_seed)))
        return rel

    def add_candidate(self, group: str, row_name: str, dataset: str, content: Content) -> str:
        pool = self.pools[(group, row_name)]
        key = content.key(dataset)
        if key in pool.did_of:
            return pool.did_of[key]
        did, index = self._new_id("c", dataset)
        image = None
        if content.scene is not None:
            image = self._image(dataset, group, f"{dataset}_c{index:06d}", content.scene, key)
        pool.records.append({"txt": content.text, "img_path": image, "modality": content.modality,
                             "did": did, "src_content": None})
        pool.did_of[key] = did
        return did

    def make_queries(self, row: EvalRow, split: str, count: int) -> list[dict]:
        group = "train" if split == "train" else "eval"
        queries = []
        for _ in range(count):
            spec = make_query(row, self.rng)
            positives = [self.add_candidate(group, row.name, row.dataset, c) for c in spec.positives]
            for dataset, content in spec.cross_positives:
                positives.append(self.add_candidate(group, f"{dataset}_task{row.task_id}", dataset, content))
            negatives = [self.add_candidate(group, row.name, row.dataset, c) for c in spec.near_misses]
            qid, index = self._new_id("q", row.dataset)
            image = None
            if spec.scene is not None:
                image = self._image(row.dataset, group, f"{row.dataset}_q{index:06d}", spec.scene, f"query|{qid}")
            queries.append({
                "qid": qid, "query_txt": spec.text, "query_img_path": image,
                "query_modality": TASKS[row.task_id][0], "query_src_content": None,
                "pos_cand_list": positives, "neg_cand_list": negatives if split == "train" else [],
                "task_id": row.task_id,
            })
        return queries

    def fill_pools(self) -> None:
        for (group, row_name), pool in self.pools.items():
            row = EVAL_ROWS_BY_NAME[row_name]
            for _ in range(self.sizes["pool"] * 20):
                if len(pool.records) >= self.sizes["pool"]:
                    break
                self.add_candidate(group, row_name, row.dataset, random_candidate(row, self.rng))

    def write_mbeir(self) -> None:
        by_split = {split: {row.name: self.make_queries(row, split, self.sizes[split]) for row in EVAL_ROWS}
                    for split in ("train", "val", "test")}
        self.fill_pools()
        train_by_dataset: dict[str, list[dict]] = {}
        for row in EVAL_ROWS:
            train_by_dataset.setdefault(row.dataset, []).extend(by_split["train"][row.name])
        for dataset in sorted(train_by_dataset, key=DATASET_IDS.get):
            _write_jsonl(self.root / f"query/train/mbeir_{dataset}_train.jsonl", train_by_dataset[dataset])
        union = [q for dataset in sorted(train_by_dataset, key=DATASET_IDS.get) for q in train_by_dataset[dataset]]
        union += train_by_dataset["nights"]
        _write_jsonl(self.root / UNION_TRAIN_QUERIES, union)
        for split in ("train", "val", "test"):
            for row in EVAL_ROWS:
                queries = by_split[split][row.name]
                if split != "train":
                    _write_jsonl(self.root / row.query_file(split), queries)
                lines = [f"{q['qid']} 0 {did} 1 {row.task_id}\n" for q in queries for did in q["pos_cand_list"]]
                atomic_write_text(self.root / row.qrels_file(split), "".join(lines))
        for row in EVAL_ROWS:
            _write_jsonl(self.root / row.local_pool_file(), self.pools[("eval", row.name)].records)
        eval_union = [c for row in EVAL_ROWS for c in self.pools[("eval", row.name)].records]
        train_union = [c for row in EVAL_ROWS for c in self.pools[("train", row.name)].records]
        _write_jsonl(self.root / GLOBAL_POOL.format(split="train"), train_union)
        for split in ("val", "test"):
            _write_jsonl(self.root / GLOBAL_POOL.format(split=split), eval_union)
        self.write_instructions()

    def write_instructions(self) -> None:
        lines = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4\n"]
        for row in EVAL_ROWS:
            texts = [t.format(domain=DOMAIN[row.dataset]) for t in INSTRUCTIONS[row.task_id]]
            lines.append("\t".join([*TASKS[row.task_id], row.name, str(row.dataset_id), *texts]) + "\n")
        atomic_write_text(self.root / QUERY_INSTRUCTIONS, "".join(lines))

    def write_nli(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["sent0", "sent1", "hard_neg"])
        for _ in range(self.sizes["nli"]):
            scene = random_scene(self.rng.choice(("scene", "news", "fashion")), self.rng)
            writer.writerow([scene.caption(), scene.paraphrase(), near_miss(scene, self.rng).caption()])
        atomic_write_text(self.out / "nli_for_simcse.csv", buffer.getvalue())

    def write_cc3m(self) -> None:
        llava, pairs = {}, []
        for index in range(self.sizes["cc3m"]):
            scene = random_scene(self.rng.choice(("scene", "news")), self.rng)
            name = f"GCC_train_{index:09d}.jpg"
            _write_bytes(self.out / "cc3m" / "images" / name, _jpeg_bytes(render(scene, name)))
            llava[f"GCC_train_{index:09d}"] = {"h5v": f"cc3m/images/{name}", "instruct_ans": [scene.caption()]}
            pairs.append({"image": name, "caption": scene.caption()})
        atomic_write_text(self.out / "cc3m" / "llava_cc3m.json", json.dumps(llava, indent=1) + "\n")
        _write_jsonl(self.out / "cc3m" / "pairs.jsonl", pairs)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_synthetic(out: str | Path, *, seed: int = 0, size: str = "small") -> Path:
    """Write the synthetic benchmark under `out` (see the module docstring); return out/M-BEIR."""
    builder = _Builder(Path(out), seed, size)
    builder.write_mbeir()
    builder.write_nli()
    builder.write_cc3m()
    return builder.root
