"""Cross-check `--profile umarvel-release` against the official U-MARVEL inference, vector by vector.

What it does, in one run:
  1. builds the tiny released-layout checkpoint (`umarvel make-tiny-model --layout umarvel-release`)
     and gives it the processor files a released checkpoint is used with: those of
     Qwen2-VL-7B-Instruct's layout (preprocessor_config.json with its pixel bounds,
     chat_template.json with its chat template, whose default system turn the official prompt
     relies on), which transformers 4.45 and 5 both read;
  2. writes a small M-BEIR-shaped benchmark (all 16 rows, every modality as query and as
     candidate, every local pool >= 50 candidates as the official top-50 search needs, one
     instruction per key and one positive per query so that the official random draws have one
     outcome) holding the hard cases: texts with newlines, carriage returns, quotes at both
     ends, leading spaces, a lower-case first letter; queries and candidates over 1024 tokens
     (text and image+text); images of extreme size and aspect (3000x2000, 8x8, 20x3900,
     3900x20, 2x300, and 7900x40 / 40x7900, whose sides round to 282:1, past the processor's
     200, which the official resize squeezes back to 200:1), a greyscale JPEG, RGBA and palette
     PNGs with transparent parts; rows of equal-length items (batches without padding: the
     official attention turns causal there), a last batch of one item, sets crossing the
     16-item batch;
  3. runs the official evaluation entry point, `eval(args)` of
     eval/eval_mbeir_local_finetune_fast.py, imported from the scratch checkout under
     transformers 4.45 in a subprocess (PYTHONPATH=<tf445>:<official>:<shim>), on that data and
     checkpoint: its datasets, collators, model, DataLoader(batch_size=16, shuffle=False,
     num_workers=8) and feature files as they are. What is set for the measurement, none of it
     in its code: the weights load in float32 and accelerate runs without bf16 autocast (the
     comparison is in fp32, as umarvel runs on CPU); a no-op `torch_npu` stands in for the
     Ascend package (torch.npu.memory_allocated/empty_cache); deepspeed, which its utils import,
     is told DS_ACCELERATOR=cpu; torch is seeded, so the marker rows its load draws at random
     (<instruction_start>, <instruction_end>) repeat from run to run. Those rows are saved for
     our side;
  4. runs `umarvel eval mbeir --pool local --profile umarvel-release` in a subprocess through
     `umarvel.cli.main`, with --set model.rules.marker_rows=<those rows> and a fresh embedding
     cache; `Embedder.encode` is wrapped to keep the fp32 vectors it returns (the cache stores
     fp16, whose rounding alone is ~1e-4) - batching, reading, prompts and the model are the
     CLI's own;
  5. compares the vectors per item and prints the max abs difference per modality x side
     (query, candidate), per hard case, the overall max, and the same against the fp16 cache.

`--family qwen3-vl` checks U-MARVEL-Qwen3VL-4B-Instruct's rules the same way: the tiny checkpoint
is a qwen3-vl one in that release's layout (nested 4.57 config), with Qwen3-VL-4B-Instruct's
processor files (16 px patches, pixel bounds 65536-16777216, mean and std 0.5, its chat template,
which has no default system turn); the official side is
eval/eval_mbeir_local_finetune_fast_sample_qwen3_vl.py (its Qwen3-VL model file, the same
datasets and collators, --batch_size 16 as its launchers leave it) under transformers 4.57,
with the checkout's models/ on the path (its model file imports its sdpa helpers from there).
Same data, same seeding; its marker rows come from 4.57's mean_resizing, within ~2e-6 of the
mean the profile's own marker_rows=mean gives (printed).

Nothing of the official code is copied here or committed: it is fetched into a scratch folder
and imported at run time. Set-up (once):

    git clone https://github.com/chaxjli/U-MARVEL /work/scratch/umarvel-official
    #   (or from a bare mirror: git --git-dir=MIRROR archive HEAD | tar -x -C /work/scratch/umarvel-official)
    pip install --target /work/scratch/tf445 --no-deps "transformers==4.45.2" "tokenizers>=0.20,<0.21" \\
        "huggingface_hub>=0.23.2,<1.0" "datasets==3.0.1"
    pip install --target /work/scratch/tf445 aiohttp      # datasets 3.0's fsspec import needs it
    # for --family qwen3-vl (its requirements_qwen3_vl.txt names transformers 4.57.0):
    pip install --target /work/scratch/tf457 --no-deps "transformers==4.57.0" "tokenizers>=0.22,<0.23" \\
        "huggingface_hub>=0.34,<1.0" "datasets==3.0.1"
    pip install --target /work/scratch/tf457 aiohttp
  (its utils.py imports transformers' Trainer, which imports datasets; the environment's datasets
  needs huggingface_hub 1.x, transformers 4.45 needs < 1.0). The rest the official code imports
  (torch, torchvision, accelerate, deepspeed, PIL, requests) comes from umarvel's own
  environment; transformers 5 stays untouched.

Run (about 13 minutes on 2 busy CPU cores, 8 of them the official side):

    python scripts/crosscheck_release.py --official /work/scratch/umarvel-official \\
        --tf445 /work/scratch/tf445 --work /work/scratch/crosscheck
    python scripts/crosscheck_release.py --family qwen3-vl --official /work/scratch/umarvel-official \\
        --tf457 /work/scratch/tf457 --work /work/scratch/crosscheck-qwen3

`--reuse-official` keeps the official vectors of an earlier run in --work; `--set KEY=VALUE`
gives our side's command a setting, to measure what one rule does (e.g.
`--set model.rules.batching=length`). Exit status 0 when every difference is <= --tolerance
(1e-5), 1 otherwise. Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = "data/M-BEIR"  # under --work: the official evaluation reads ./data/M-BEIR/ from its working directory
CHECKPOINT = "U-MARVEL-tiny"
OFFICIAL_OUT = "official"
MARKER_ROWS = "marker_rows.npy"
MIN_POOL = 50  # the official search takes torch.topk(k=50) over each local pool
# Qwen2-VL-7B-Instruct's processor facts (its preprocessor_config.json and chat template).
QWEN2VL_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in "
    "content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-4B-Instruct's processor facts (preprocessor_config.json, video_preprocessor_config.json) and the
# part of its chat template the official prompts reach (an optional system turn, user and assistant turns of
# text and image parts, the generation prompt; no default system turn): what U-MARVEL-Qwen3VL-4B-Instruct's
# evaluation loads from its ORIGINAL_MODEL_ID (the processor is saved unchanged by its merge step).
QWEN3VL_IMAGE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}
QWEN3VL_VIDEO = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
                 "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor"}
QWEN3VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for part in messages[0].content %}{%- if 'text' in part %}"
    "{{- part.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if message.role == 'user' and (part.type == 'image' or 'image' in part or 'image_url' in part) %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif message.role == 'user' and (part.type == 'video' or 'video' in part) %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class Official:
    """Where a family's official evaluation lives and what it runs under."""

    eval_file: str  # in the checkout
    model_class: str  # the name its eval module imports the model class under
    transformers: str  # the version (prefix) it needs, from a --target folder
    target: str  # the option naming that folder
    batch_size: int | None  # its --batch_size argument (None: the script has none, 16 is fixed)


OFFICIAL = {
    "qwen2-vl": Official("eval/eval_mbeir_local_finetune_fast.py", "Qwen2VLRetFinetuneForConditionalGeneration",
                         "4.45", "tf445", None),
    "qwen3-vl": Official("eval/eval_mbeir_local_finetune_fast_sample_qwen3_vl.py",
                         "Qwen3VLRetFinetuneForConditionalGeneration", "4.57", "tf457", 16),
}
# The official evaluation's id hashing (dataset id * bound + number), undone to compare by id.
QUERY_BOUND, CANDIDATE_BOUND = 500_000, 10_000_000
WORDS = ("river stone market light window garden bridge morning silver yellow orange painted quiet "
         "street mountain forest harbour train station evening shadow winter summer field cloud").split()


# ---- 1. the checkpoint ----------------------------------------------------------------------

def build_checkpoint(work: Path, family: str) -> Path:
    """The tiny released-layout checkpoint of `family` with its base model's processor files:
    Qwen2-VL-7B-Instruct's (pixel bounds, chat template with its default system turn) or
    Qwen3-VL-4B-Instruct's (16 px patches, pixel bounds 65536-16777216, mean and std 0.5, chat
    template without a default system turn)."""
    raw, out = work / "tiny-release", work / CHECKPOINT
    _run([sys.executable, "-m", "umarvel", "make-tiny-model", "--family", family, "--layout", "umarvel-release",
          "--out", str(raw)])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(raw / name, out / name)
    if family == "qwen3-vl":
        chat_template, processor_class = QWEN3VL_CHAT_TEMPLATE, "Qwen3VLProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(QWEN3VL_IMAGE, indent=2) + "\n")
        (out / "video_preprocessor_config.json").write_text(json.dumps(QWEN3VL_VIDEO, indent=2) + "\n")
    else:
        chat_template, processor_class = QWEN2VL_CHAT_TEMPLATE, "Qwen2VLProcessor"
        processor = json.loads((raw / "processor_config.json").read_text())
        image = {k: v for k, v in processor["image_processor"].items() if k != "size"}
        (out / "preprocessor_config.json").write_text(json.dumps(
            {**image, **QWEN2VL_PIXELS, "processor_class": processor_class}, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": chat_template}, indent=2) + "\n")
    tokenizer = json.loads((raw / "tokenizer.json").read_text())
    special = [t for t in tokenizer["added_tokens"] if t["special"]]
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for t in special},
        "additional_special_tokens": [t["content"] for t in special if t["content"] != "<|endoftext|>"],
        "bos_token": None, "chat_template": chat_template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2) + "\n")
    return out


# ---- 2. the data ------------------------------------------------------------------------------

class Writer:
    """An M-BEIR-shaped benchmark with a label per hard-case item (`cases`)."""

    def __init__(self, root: Path, seed: int = 0):
        self.root, self.rng = root, random.Random(seed)
        self.cases: dict[str, str] = {}  # "query:<qid>" / "candidate:<did>" -> hard case
        self.numbers: dict[int, int] = {}

    def next_id(self, dataset_id: int) -> str:
        self.numbers[dataset_id] = self.numbers.get(dataset_id, 0) + 1
        return f"{dataset_id}:{self.numbers[dataset_id]}"

    def words(self, count: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(count))

    def image(self, dataset: str, name: str, size: tuple[int, int], mode: str = "RGB") -> str:
        """A picture of random blocks (so the vision tower sees structure), its path under the root:
        JPEG for RGB and greyscale, PNG with transparent blocks for RGBA and palette images."""
        from PIL import Image

        suffix = "jpg" if mode in ("RGB", "L") else "png"
        relative = f"mbeir_images/{'oven' if dataset == 'infoseek' else dataset}_images/{name}.{suffix}"
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        cells = (max(1, min(size[0], 12)), max(1, min(size[1], 12)))
        small = Image.new("RGBA", cells)
        small.putdata([(*(self.rng.randrange(256) for _ in range(3)), self.rng.choice((0, 128, 255)))
                       for _ in range(cells[0] * cells[1])])
        picture = small.resize(size, Image.NEAREST if mode in ("RGBA", "P") else Image.BILINEAR)
        if mode == "P":  # palette entry 0 transparent
            picture.convert("RGB").quantize(16).save(path, transparency=0)
        elif mode == "RGBA":
            picture.save(path)
        else:
            picture.convert(mode).save(path, quality=92)
        return relative


# (case label, text): the text hard cases; `long` is filled in with > 1024 tokens.
TEXT_CASES = [
    ("newline", "a harbour at dusk\nwith two boats\n\nand a crane"),
    ("carriage return", "windows of the station\r\nlit in the evening\r"),
    ("quoted", '"A quoted caption of a river"'),
    ("quoted, inner spaces", '"  spaces inside the quotes  "'),
    ("leading spaces", "   three leading spaces before the market"),
    ("lower-case start", "ßtraße in the morning light"),
    ("ends in ?", "which bridge crosses the river?"),
]
IMAGE_CASES = [  # (case label, (width, height), mode), all within the Qwen2-VL processor's aspect limit of 200
    ("image 3000x2000", (3000, 2000), "RGB"),
    ("image 8x8", (8, 8), "RGB"),
    ("image 20x3900", (20, 3900), "RGB"),
    ("image 3900x20", (3900, 20), "RGB"),
    ("image 2x300", (2, 300), "RGB"),
    ("image 7900x40 (rounds to 282:1)", (7900, 40), "RGB"),
    ("image 40x7900 (rounds to 1:282)", (40, 7900), "RGB"),
    ("greyscale JPEG", (64, 48), "L"),
    ("RGBA PNG, transparent parts", (64, 48), "RGBA"),
    ("palette PNG, a transparent colour", (64, 48), "P"),
]


def write_benchmark(root: Path) -> dict[str, str]:
    """Write the benchmark under `root`; return the hard-case label of each labelled item."""
    sys.path.insert(0, str(REPO))
    from umarvel.data.tasks import EVAL_ROWS, GLOBAL_POOL, QUERY_INSTRUCTIONS

    shutil.rmtree(root, ignore_errors=True)
    writer = Writer(root)
    long_text = writer.words(1300)  # > 1024 tokens in any tokenizer: every word is at least one
    texts = TEXT_CASES + [("long text", long_text)]
    pools, union = {}, []
    for row in EVAL_ROWS:
        modality = row.modalities[1]
        pool = []
        for index in range(MIN_POOL + (6 if row.name == "nights_task4" else 0)):
            case, text, size, mode = None, writer.words(3 + index % 7), (56 + 8 * (index % 5), 56 + 4 * (index % 3)), "RGB"
            if row.name == "nights_task4":
                size = (64, 64)  # equal lengths: every batch of this pool is unpadded (causal officially)
                case = "equal-length batch"
            elif "text" in modality and index < len(texts):
                case, text = texts[index]
            elif "image" in modality and len(texts) <= index < len(texts) + len(IMAGE_CASES):
                case, size, mode = IMAGE_CASES[index - len(texts)]
            did = writer.next_id(row.dataset_id)
            image = writer.image(row.dataset, f"cand_{did.replace(':', '_')}", size, mode) if "image" in modality else None
            pool.append({"txt": text if "text" in modality else None, "img_path": image, "modality": modality,
                         "did": did, "src_content": None})
            if case:
                writer.cases[f"candidate:{did}"] = case
        pools[row.name] = pool
        union += pool
        _write_jsonl(root / row.local_pool_file(), pool)
    _write_jsonl(root / GLOBAL_POOL.format(split="test"), union)

    for row in EVAL_ROWS:
        modality, pool = row.modalities[0], pools[row.name]
        # 20: a batch of 16 and one of 4; 17: a last batch of one; 18: every image case with text
        count = {"nights_task4": 8, "webqa_task1": 20, "oven_task6": 17, "infoseek_task6": 18}.get(row.name, 10)
        records, qrels = [], []
        for index in range(count):
            case, text, size, mode = None, writer.words(4 + index % 5), (70 + 14 * (index % 4), 60 + 10 * (index % 3)), "RGB"
            if row.name == "nights_task4":
                size, case = (64, 64), "equal-length batch"  # 8 image queries of one length: one unpadded batch
            elif "text" in modality and index < len(texts):
                case, text = texts[index]
                if case == "long text":
                    text = writer.words(1100)
            elif modality == "image" and index < len(IMAGE_CASES):
                case, size, mode = IMAGE_CASES[index]
            elif modality == "image,text" and len(texts) <= index < len(texts) + len(IMAGE_CASES):
                case, size, mode = IMAGE_CASES[index - len(texts)]
            qid = writer.next_id(row.dataset_id)
            if row.name == "oven_task6" and index == count - 1:
                case = "last batch of one"
            image = writer.image(row.dataset, f"query_{qid.replace(':', '_')}", size, mode) if "image" in modality else None
            positive = pool[index % len(pool)]["did"]
            records.append({"qid": qid, "query_txt": text if "text" in modality else None, "query_img_path": image,
                            "query_modality": modality, "query_src_content": None, "pos_cand_list": [positive],
                            "neg_cand_list": [], "task_id": row.task_id})
            qrels.append(f"{qid} 0 {positive} 1 {row.task_id}")
            if case:
                writer.cases[f"query:{qid}"] = case
        _write_jsonl(root / row.query_file("test"), records)
        (root / row.qrels_file("test")).parent.mkdir(parents=True, exist_ok=True)
        (root / row.qrels_file("test")).write_text("\n".join(qrels) + "\n")

    # one instruction per (dataset, query modality, candidate modality): the official draw has one outcome
    lines = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\n"]
    lines += [f"{row.modalities[0]}\t{row.modalities[1]}\t{row.name}\t{row.dataset_id}\t"
              f"retrieve what matches this {row.modalities[0].replace(',', ' and ')} for {row.dataset}\n"
              for row in EVAL_ROWS]
    (root / QUERY_INSTRUCTIONS).parent.mkdir(parents=True, exist_ok=True)
    (root / QUERY_INSTRUCTIONS).write_text("".join(lines))
    return writer.cases


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


# ---- 3. the official side (runs under transformers 4.45) -------------------------------------

SHIM = '''"""No-op stand-in for Huawei's torch_npu (crosscheck_release.py): the official evaluation
imports it and calls torch.npu.memory_allocated()/empty_cache(); nothing runs on an NPU here."""
import types
import torch

torch.npu = types.SimpleNamespace(memory_allocated=lambda *a, **k: 0, empty_cache=lambda: None,
                                  is_available=lambda: False, device_count=lambda: 0)
'''


def run_official(work: Path, official: Path, target: Path, family: str) -> None:
    shim = work / "shim"
    (shim / "torch_npu" / "contrib").mkdir(parents=True, exist_ok=True)
    (shim / "torch_npu" / "__init__.py").write_text(SHIM)
    (shim / "torch_npu" / "contrib" / "__init__.py").write_text("")
    (shim / "torch_npu" / "contrib" / "transfer_to_npu.py").write_text("")
    shutil.rmtree(work / OFFICIAL_OUT, ignore_errors=True)
    # the Qwen3-VL model file imports its sdpa helpers as a top-level module from models/
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (target, official, official / "models", shim))),
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    log = work / "official.log"
    spec = OFFICIAL[family]
    print(f"official side: {spec.eval_file} under transformers {spec.transformers} (log: {log})", flush=True)
    with open(log, "w") as handle:
        code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", "official", "--family", family,
                               "--official", str(official), "--work", str(work)],
                              cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"the official side failed (exit {code}); see {log}")


def official_side(work: Path, official: Path, family: str) -> None:
    """Inside the subprocess: call the official eval(args) on ./data/M-BEIR, fp32, no autocast."""
    import importlib.util
    import types

    import accelerate
    import numpy as np
    import torch
    import transformers

    facts = OFFICIAL[family]
    assert transformers.__version__.startswith(facts.transformers), transformers.__version__
    torch.manual_seed(0)  # its marker rows are drawn at load; seeded, a re-run draws the same
    spec = importlib.util.spec_from_file_location("official_eval", official / facts.eval_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    real_model, real_processor, loaded = getattr(module, facts.model_class), module.AutoProcessor, {}

    def load_model(path, **kwargs):
        kwargs["torch_dtype"] = torch.float32  # its eval loads bf16; the comparison is in fp32
        loaded["model"] = real_model.from_pretrained(path, **kwargs)
        return loaded["model"]

    def load_processor(path, **kwargs):
        loaded["processor"] = real_processor.from_pretrained(path, **kwargs)
        return loaded["processor"]

    setattr(module, facts.model_class, types.SimpleNamespace(from_pretrained=load_model))
    module.AutoProcessor = types.SimpleNamespace(from_pretrained=load_processor)
    module.Accelerator = lambda **kwargs: accelerate.Accelerator(**{**kwargs, "mixed_precision": "no"})
    # its paths are relative to the working directory; ours is --work, which holds data/M-BEIR
    root = Path.cwd() / DATA
    missing = [path for path in module.query_data_paths + module.cand_pool_paths + module.qrels_paths
               + module.query_cand_pool_paths if not Path(path).is_file()]
    assert not missing, f"benchmark files the official evaluation reads are missing: {missing[:3]}"
    checkpoint = str(work / CHECKPOINT)
    args = types.SimpleNamespace(
        instructions_path=str(root / "instructions/query_instructions.tsv"), model_max_length=1024,
        original_model_id=checkpoint, model_id=checkpoint, save_dir_name=str(work / OFFICIAL_OUT),
        image_path_prefix=f"./{DATA}/", query_dataset_has_instruction="True",
        query_dataset_use_instruction_token="True", model_mean_pooling="True", model_use_bi_atten="True",
        model_use_latent_atten="False", model_use_instruction_mask="True",
    )  # the flags of scripts/eval/fast_eval/vtools_eval_mbeir_local_fast_qwen2-vl-7b_umarvel_*.py (and qwen3_vl/*_4b_*)
    if facts.batch_size is not None:
        args.batch_size = facts.batch_size  # the Qwen3-VL script's default, which its launchers keep
    module.eval(args)
    model, tokenizer = loaded["model"], loaded["processor"].tokenizer
    print("attention implementation:", model.config._attn_implementation)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<emb>", "<instruction_start>", "<instruction_end>")]
    weight = model.get_input_embeddings().weight.detach().float()
    np.save(work / MARKER_ROWS, weight[ids[1:]].numpy())
    print("added token ids:", ids, "embedding rows:", weight.shape[0])
    mean = weight[:ids[1]].mean(0)
    print("marker rows' max abs distance from the mean of the rows before them (marker_rows=mean):",
          f"{float((weight[ids[1:]] - mean).abs().max()):.2e}")


# ---- 4. our side: the CLI ------------------------------------------------------------------------

def run_ours(work: Path, overrides: list[str]) -> None:
    log = work / "ours.log"
    print(f"our side: umarvel eval mbeir --profile umarvel-release {''.join('--set ' + o + ' ' for o in overrides)}"
          f"(log: {log})", flush=True)
    with open(log, "w") as handle:
        code = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", "ours", "--work", str(work),
                               *[f"--set={o}" for o in overrides]],
                              cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"our side failed (exit {code}); see {log}")


def our_side(work: Path, overrides: list[str]) -> None:
    """Inside the subprocess: `umarvel eval mbeir` via umarvel.cli.main, keeping the fp32 vectors
    Embedder.encode returns (what the cache then stores in fp16)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from umarvel import cli
    from umarvel.modeling.embedder import Embedder

    vectors: dict[str, np.ndarray] = {}
    encode = Embedder.encode

    def recording(self, items, *args, **kwargs):
        out = encode(self, items, *args, **kwargs)
        for item, vector in zip(items, out):
            key = f"query:{item['qid']}" if item.get("qid") else f"candidate:{item['did']}"
            vectors[key] = np.array(vector, dtype=np.float32)
        return out

    Embedder.encode = recording
    shutil.rmtree(work / "ours", ignore_errors=True)
    code = cli.main(["eval", "mbeir", "--pool", "local", "--profile", "umarvel-release",
                     "--model", str(work / CHECKPOINT), "--data", str(work / DATA),
                     "--output-dir", str(work / "ours" / "eval"), "--cache-dir", str(work / "ours" / "cache"),
                     "--set", f"model.rules.marker_rows={work / MARKER_ROWS}",
                     *[argument for override in overrides for argument in ("--set", override)]])
    if code:
        sys.exit(code)
    keys = sorted(vectors)
    np.savez(work / "ours_vectors.npz", keys=np.array(keys), vectors=np.stack([vectors[k] for k in keys]))


# ---- 5. the comparison -----------------------------------------------------------------------------

def official_vectors(work: Path) -> dict:
    import torch

    vectors = {}
    for file in sorted((work / OFFICIAL_OUT).glob("*_query_features.pth")):
        stem = file.name.removesuffix("_query_features.pth")
        for side, bound, ids_name, features_name in (
                ("query", QUERY_BOUND, "_query_ids.json", "_query_features.pth"),
                ("candidate", CANDIDATE_BOUND, "_candidate_ids.json", "_candidate_features.pth")):
            ids = json.loads((work / OFFICIAL_OUT / f"{stem}{ids_name}").read_text())
            features = torch.load(work / OFFICIAL_OUT / f"{stem}{features_name}", weights_only=True).float().numpy()
            assert len(ids) == len(features), file
            for hashed, vector in zip(ids, features):
                vectors[f"{side}:{hashed // bound}:{hashed % bound}"] = vector
    return vectors


def cache_vectors(work: Path) -> dict:
    """What the embedding cache holds (fp16), by the same keys."""
    import numpy as np

    vectors = {}
    for shard in sorted((work / "ours" / "cache").glob("*/*/shard-*.npy")):
        side = "query" if "_queries-" in shard.parent.name else "candidate"
        ids = shard.with_name(shard.name.replace(".npy", ".ids.txt")).read_text().split("\n")
        for key, vector in zip(ids, np.load(shard)):
            vectors[f"{side}:{key}"] = vector.astype(np.float32)
    return vectors


def compare(work: Path, cases: dict[str, str], tolerance: float) -> bool:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from umarvel.data.tasks import EVAL_ROWS

    theirs = official_vectors(work)
    saved = np.load(work / "ours_vectors.npz")
    ours = dict(zip(saved["keys"].tolist(), saved["vectors"]))
    cached = cache_vectors(work)
    if set(theirs) != set(ours) or set(ours) != set(cached):
        sys.exit(f"the sides encoded different items: official {len(theirs)}, ours {len(ours)}, cache {len(cached)}; "
                 f"e.g. {sorted(set(theirs) ^ set(ours))[:5]}")
    modality = {}
    for row in EVAL_ROWS:
        for line in (work / DATA / row.query_file("test")).read_text().splitlines():
            record = json.loads(line)
            modality[f"query:{record['qid']}"] = record["query_modality"]
        for line in (work / DATA / row.local_pool_file()).read_text().splitlines():
            record = json.loads(line)
            modality[f"candidate:{record['did']}"] = record["modality"]

    def table(title: str, group, sort=None) -> list[tuple[str, int, float, float]]:
        groups: dict[str, list[str]] = {}
        for key in sorted(ours):
            label = group(key)
            if label:
                groups.setdefault(label, []).append(key)
        rows = []
        for label, keys in sorted(groups.items(), key=lambda pair: sort(pair[0])) if sort else groups.items():
            fp32 = max(float(np.abs(ours[k] - theirs[k]).max()) for k in keys)
            fp16 = max(float(np.abs(cached[k] - theirs[k]).max()) for k in keys)
            rows.append((label, len(keys), fp32, fp16))
        print(f"\n| {title} | items | max abs diff (CLI, fp32) | max abs diff (embedding cache, fp16) |")
        print("|---|---|---|---|")
        for label, count, fp32, fp16 in rows:
            print(f"| {label} | {count} | {fp32:.2e} | {fp16:.2e} |")
        return rows

    order = {"query": 0, "candidate": 1, "text": 0, "image": 1, "image,text": 2}
    by_modality = table("modality x side", lambda key: f"{modality[key]} {key.split(':')[0]}",
                        lambda label: [order[part] for part in reversed(label.split())])
    known = [case for case, _ in TEXT_CASES] + ["long text"] + [case for case, _, _ in IMAGE_CASES] + \
        ["equal-length batch", "last batch of one"]
    table("hard case", lambda key: cases.get(key) and f"{cases[key]} ({key.split(':')[0]})",
          lambda label: (order[label.rsplit("(", 1)[1][:-1]], known.index(label.rsplit(" (", 1)[0])))
    worst = max(fp32 for _, _, fp32, _ in by_modality)
    worst16 = max(fp16 for _, _, _, fp16 in by_modality)
    print(f"\noverall max abs diff over {len(ours)} items: {worst:.2e} (fp32 vectors of the CLI), "
          f"{worst16:.2e} (fp16 cache); goal <= {tolerance:.0e}")
    return worst <= tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog=textwrap.dedent(__doc__.split("\n", 1)[1]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, help="the U-MARVEL checkout (scratch folder)")
    parser.add_argument("--family", choices=sorted(OFFICIAL), default="qwen2-vl",
                        help="the release to check: U-MARVEL-Qwen2VL-7B-Instruct's or U-MARVEL-Qwen3VL-4B-Instruct's")
    parser.add_argument("--tf445", type=Path, help="pip --target folder holding transformers 4.45 (qwen2-vl)")
    parser.add_argument("--tf457", type=Path, help="pip --target folder holding transformers 4.57 (qwen3-vl)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder for checkpoint, data and vectors")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--reuse-official", action="store_true",
                        help="keep the official vectors of an earlier run in --work (same checkpoint and data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a --set for our side's command, to measure what one rule does "
                             "(e.g. model.rules.batching=length); repeatable")
    parser.add_argument("--side", choices=["official", "ours"], help=argparse.SUPPRESS)  # the subprocesses
    args = parser.parse_args()
    work = args.work.resolve()
    if args.side == "official":
        return official_side(work, args.official.resolve(), args.family)
    if args.side == "ours":
        return our_side(work, args.overrides)
    option = OFFICIAL[args.family].target
    target = getattr(args, option)
    if not args.reuse_official and not (args.official and target):
        parser.error(f"--official and --{option} are needed for {args.family} (see the set-up above)")
    work.mkdir(parents=True, exist_ok=True)
    if args.reuse_official:
        cases = json.loads((work / "cases.json").read_text())
    else:
        build_checkpoint(work, args.family)
        cases = write_benchmark(work / DATA)
        (work / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
        run_official(work, args.official.resolve(), target.resolve(), args.family)
    run_ours(work, args.overrides)
    sys.exit(0 if compare(work, cases, args.tolerance) else 1)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")


if __name__ == "__main__":
    main()
