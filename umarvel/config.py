"""The one config schema: typed sections, YAML files with `inherit:`, dotted overrides.

Every field has a default, a one-line doc and, for numbers, its allowed range (``doc(...)``).
Unknown keys, wrong types and out-of-range values are errors that name the key's full path and
what it accepts, so a typo in a 64-GPU job fails before any GPU time, never as a traceback (or a
run of 0 steps) later. Checks that tie two fields together are a section's `check()`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from umarvel.errors import UmarvelError


class ConfigError(UmarvelError, ValueError):
    """A config file, override or value is wrong; the message names where."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a number field: `low <= v` (or `low < v` when `low_open`), `v <= high`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        return " and ".join(part for part in (low, high) if part)


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, *,
        at_least: float | None = None, above: float | None = None, at_most: float | None = None):
    """A dataclass field carrying its one-line documentation and, for a number, its allowed range."""
    metadata: dict[str, Any] = {"doc": text}
    if at_least is not None or above is not None or at_most is not None:
        metadata["range"] = Range(above if above is not None else at_least, at_most, above is not None)
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


PROGRESSIVE_STAGES = ("nli", "cc3m", "mbeir")


@dataclass
class LoraConfig:
    enabled: bool = doc("Attach a LoRA adapter to the language model (False: train nothing but temperature).", True)
    r: int = doc("LoRA rank.", 8, at_least=1)
    alpha: int = doc("LoRA alpha (scaling = alpha / r).", 16, above=0)
    dropout: float = doc("Dropout on the LoRA branch.", 0.05, at_least=0, at_most=1)
    target_modules: list[str] = doc(
        "Module name suffixes to adapt; empty = every nn.Linear of the language model.", factory=list
    )


@dataclass
class TemperatureConfig:
    init: float = doc("Initial InfoNCE temperature, within [min, max].", 0.05, above=0)
    learnable: bool = doc("Learn the temperature (paper stages 1c, 2, 3) or keep it fixed.", False)
    min: float = doc("Lower clamp of the learned temperature.", 0.005, above=0)
    max: float = doc("Upper clamp of the learned temperature.", 0.2, above=0)

    def check(self) -> list[tuple[str, str]]:
        if not self.min <= self.init <= self.max:
            return [("init", f"{self.init:g} is outside [min, max] = [{self.min:g}, {self.max:g}]")]
        return []


@dataclass
class PromptConfig:
    use_instruction: bool = doc("Prepend the task instruction to queries (paper Table 2).", True)
    compression_prompt: bool = doc(
        "Append 'Summarize above ... in one word:' and an assistant turn (paper Table 1).", False
    )
    system_prompt: str = doc("System message of the chat template; empty = no system turn.", "You are a helpful assistant.")
    max_text_tokens: int = doc("Token budget for an item's text (instruction + text); image tokens never cut.", 480, at_least=1)
    min_pixels: int = doc("Smallest image area in pixels after resizing, in squares of the backbone family's pixel "
                          "unit (umarvel/backbones); 0 = the family's default.", 0, at_least=0)
    max_pixels: int = doc("Largest image area in pixels after resizing, in squares of the family's pixel unit; "
                          "0 = the family's default.", 0, at_least=0)

    def check(self) -> list[tuple[str, str]]:
        if 0 < self.max_pixels < self.min_pixels:
            return [("max_pixels", f"{self.max_pixels} is below min_pixels {self.min_pixels}")]
        return []


@dataclass
class ProfileRulesConfig:
    """Each rule of an embedding profile on its own; None keeps the profile's (umarvel/profiles.py)."""

    template: Optional[Literal["umarvel", "release"]] = doc(
        "Prompt layout: umarvel's, or the released checkpoint's (<emb> turn, instruction markers, 'Summarize above' "
        "suffixes); null = the profile's.", None)
    release_quirks: Optional[bool] = doc(
        "With the release template: image-only candidates get the 'image and sentence' suffix and image-only queries "
        "end in '<instruction_end>.', as the official inference renders them; null = the profile's.", None)
    marker_rows: Optional[str] = doc(
        "Embedding rows of <instruction_start>/<instruction_end>: 'seed:N' (normal(0, 0.02) from seed N), 'mean' (the "
        "mean of the rows before them, as transformers >= 4.46 resizes) or a .safetensors/.npy file of shape "
        "(2, hidden); null = the profile's.", None)
    positions: Optional[Literal["mrope", "1d"]] = doc(
        "Rotary positions: M-RoPE (2-D for image tokens) or 1-D arange on all three axes; null = the profile's.", None)
    unpadded_causal: Optional[bool] = doc(
        "Run batches without padding causally even with model.attention=bidirectional (the release's mask quirk); "
        "null = the profile's.", None)
    truncation: Optional[Literal["text", "candidates"]] = doc(
        "Cut each item's text to prompt.max_text_tokens, or cut only candidates' whole token sequence to "
        "candidate_max_tokens (queries never cut); null = the profile's.", None)
    candidate_max_tokens: Optional[int] = doc("Token limit of a candidate with truncation=candidates; null = the "
                                              "profile's.", None)
    system_turn: Optional[bool] = doc(
        "With the release template: open with the 'You are a helpful assistant.' system turn (Qwen2-VL's chat "
        "template adds it, Qwen3-VL's does not); null = the profile's.", None)
    deepstack: Optional[bool] = doc(
        "Add the vision tower's DeepStack features to the first decoder layers (Qwen3-VL; the released "
        "Qwen3-VL checkpoint's inference leaves them out); null = the profile's.", None)
    image_resize: Optional[Literal["family", "qwen2-vl"]] = doc(
        "qwen-vl-utils resize before the processor: in the backbone family's pixel unit and bounds, or in "
        "Qwen2-VL's (28 px, as the released Qwen3-VL checkpoint's inference does); null = the profile's.", None)
    processor_pixels: Optional[Literal["prompt", "checkpoint"]] = doc(
        "Pixel bounds of the processor's own resize: prompt.min_pixels/max_pixels, or those saved with the "
        "checkpoint's processor (the released Qwen3-VL checkpoint's inference keeps Qwen3-VL's 65536-16777216, so a "
        "small picture is enlarged); null = the profile's.", None)
    batching: Optional[str] = doc(
        "How encoding forms batches: 'length' (sorted by estimated length, encode.batch_size per batch) or 'file:N' "
        "(N items per batch in file order, whatever encode.batch_size says); null = the profile's.", None)
    text_format: Optional[Literal["umarvel", "release"]] = doc(
        "Normalisation of M-BEIR texts: umarvel's (newlines to spaces, quotes kept) or the official format_string "
        "(newlines kept, carriage returns deleted, quotes stripped at both ends); null = the profile's.", None)
    images: Optional[Literal["umarvel", "release"]] = doc(
        "Reading images: umarvel's (any mode to true RGB: transparency on white, 16-bit scaled; an image whose sides, "
        "rounded into visual tokens, differ over 200x refused) or the official inference's (PIL's convert('RGB'): "
        "transparency dropped, 16-bit clipped; such a side cut to 200x the other); null = the profile's.", None)


@dataclass
class ModelConfig:
    backbone: str = doc("Path to a model directory of a supported family, umarvel/backbones (never a hub id).", "")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Weight dtype; auto = bfloat16 on CUDA, float32 on CPU.", "auto"
    )
    device: str = doc("Device for encoding outside a launcher: auto, cpu, cuda, cuda:N.", "auto")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = doc(
        "Attention kernel of the backbone.", "sdpa"
    )
    attention: Literal["bidirectional", "causal"] = doc("Language-model attention mode (paper Finding 1).", "bidirectional")
    pooling: Literal["mean", "last"] = doc("Pool the last hidden states by masked mean or take the last token.", "mean")
    mask_instruction: bool = doc("Leave instruction tokens out of the mean pool (paper Finding 2).", True)
    gradient_checkpointing: bool = doc("Recompute activations in backward to save memory.", False)
    lora: LoraConfig = doc("LoRA adapter on the language model.", factory=LoraConfig)
    temperature: TemperatureConfig = doc("InfoNCE temperature kept with the embedder.", factory=TemperatureConfig)
    prompt: PromptConfig = doc("How an item becomes model input.", factory=PromptConfig)
    profile: str = doc("Embedding profile (umarvel/profiles.py): umarvel, or umarvel-release to embed as the released "
                       "checkpoint's official inference does.", "umarvel")
    rules: ProfileRulesConfig = doc("Override single rules of the profile.", factory=ProfileRulesConfig)


@dataclass
class DataConfig:
    source: Literal["mbeir", "nli", "cc3m"] = doc("Training source of the stage.", "mbeir")
    path: str = doc("M-BEIR root, NLI csv, or CC3M file (.json LLaVA form or .jsonl pairs).", "")
    image_root: str = doc("Directory CC3M image names resolve under.", "")
    train_queries: str = doc("M-BEIR query file relative to the root; empty = the union train file.", "")
    pool: str = doc("M-BEIR candidate pool relative to the root; empty = the union train pool.", "")
    hard_negatives: str = doc("Mined hard-negative file (stage 2); empty = none.", "")
    num_negatives: int = doc("Extra negatives per query: mined ones for M-BEIR, NLI hard_neg when > 0.", 0, at_least=0)
    negative_selection: Literal["top", "sample"] = doc(
        "Mined negatives a query trains with: its top num_negatives by score (paper), or a seeded draw among its "
        "top negative_sample_depth.", "top"
    )
    negative_sample_depth: int = doc("With negative_selection=sample: draw among this many top-scored negatives.", 0, at_least=0)
    negative_top_up: bool = doc(
        "Fill a query that has fewer than num_negatives mined negatives with random pool candidates (counted in "
        "metrics.json); off: such queries stop the stage at start, or are dropped with on_error=skip.", False
    )
    on_error: Literal["raise", "skip"] = doc("Bad rows: stop with a clear error, or skip, count and report.", "raise")
    allow_symlinks_outside_root: bool = doc(
        "Read image paths that are symlinks resolving outside the data root (a tree linking mbeir_images/ from "
        "another disk); off: such images are refused. Training, eval and mining read images under it.", False
    )
    max_image_pixels: int = doc(
        "Largest image file read, in pixels (width x height, from its header, before decoding); larger files are "
        "an error naming them (default: the limit PIL itself refuses at). Training, eval and mining read images "
        "under it.", 178_956_970, at_least=1,
    )
    max_samples: int = doc("Use only the first N training pairs (0 = all); for smoke runs.", 0, at_least=0)
    num_workers: int = doc("DataLoader worker processes (0 = load in the training process).", 0, at_least=0)


@dataclass
class LossConfig:
    bidirectional: bool = doc("Add candidate -> query InfoNCE (paper stage 1b).", False)
    negatives_scope: Literal["own", "global"] = doc(
        "Extra negatives a query sees: its own, or every one in the global batch.", "global"
    )
    in_batch_negatives: bool = doc("Contrast against other queries' positives (off = hard negatives only, Table 5).", True)
    mask_false_negatives: bool = doc(
        "Drop in-batch candidates that are positives of the query (by document id). In neither the paper nor the "
        "official code: configs/umarvel turn it off; on for data whose batches often repeat a document.", True
    )
    gradcache_chunk_size: int = doc("GradCache chunk (items per forward); 0 = plain backward.", 0, at_least=0)
    gradcache_chunk_tokens: int | None = doc(
        "GradCache chunks by tokens: at most this many (items x longest item, text and visual tokens) per forward, "
        "an item over it alone; with gradcache_chunk_size, both bound a chunk; null = off.", None, at_least=1,
    )


@dataclass
class TrainConfig:
    learning_rate: float = doc("Peak learning rate.", 1e-4, at_least=0)
    per_device_batch_size: int = doc("Queries per device per step (global batch = this x devices).", 8, at_least=1)
    gradient_accumulation_steps: int = doc("Steps per update; does NOT add negatives (use GradCache).", 1, at_least=1)
    epochs: float = doc("Passes over the training pairs (> 0 unless max_steps is set).", 1.0, at_least=0)
    max_steps: int = doc("Stop after this many updates (-1 or 0 = by epochs).", -1, at_least=-1)
    warmup_ratio: float = doc("Fraction of updates with linear warm-up.", 0.0, at_least=0, at_most=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = doc("LR schedule.", "linear")
    weight_decay: float = doc("AdamW weight decay (never on biases, norms or the temperature).", 0.0, at_least=0)
    temperature_learning_rate: float = doc(
        "Learning rate of the learnable temperature's own optimizer group (tau itself is the parameter); "
        "0 = train.learning_rate, as in the reference code, with which the paper's 0.05 -> 0.0206 is reached.", 0.0,
        at_least=0,
    )
    max_grad_norm: float = doc("Gradient clipping norm (0 = off).", 1.0, at_least=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc("Mixed precision; auto = bf16 on CUDA, fp32 on CPU.", "auto")
    deepspeed: str = doc("DeepSpeed config JSON (e.g. configs/deepspeed/zero2.json); empty = none.", "")
    logging_steps: int = doc("Log loss, temperature and accuracy every N updates.", 10, at_least=1)
    save_steps: int = doc("Checkpoint every N updates.", 500, at_least=1)
    save_total_limit: int = doc("Keep at most N checkpoints.", 2, at_least=1)
    report_to: list[str] = doc("Loggers: tensorboard, wandb (empty = none).", factory=lambda: ["tensorboard"])
    eval_steps: int = doc(
        "Every N updates (and after the last) measure recall on a sampled M-BEIR val pool, log it as "
        "eval_recall@1/5/10 and keep the best model by eval_metric as the run's model (M-BEIR stages: 1c, 2, 3; "
        "skipped with a log line on NLI and CC3M data); 0 = off.", 0, at_least=0,
    )
    eval_queries: int = doc("Val queries drawn (seeded by run.seed, the same at every eval) from the rows of "
                            "eval.mbeir.rows.", 500, at_least=1)
    eval_pool_size: int = doc("Candidates searched: the drawn queries' positives plus random others of the rows' "
                              "local pools, this many in all (or the positives alone, if more).", 5000, at_least=1)
    eval_metric: Literal["recall@1", "recall@5", "recall@10"] = doc(
        "The val recall that picks the best model.", "recall@5"
    )
    loss: LossConfig = doc("The contrastive loss.", factory=LossConfig)

    def check(self) -> list[tuple[str, str]]:
        if self.epochs <= 0 and self.max_steps <= 0:
            return [("epochs", f"{self.epochs:g} trains nothing: set epochs > 0, or max_steps > 0")]
        return []


@dataclass
class EncodeConfig:
    batch_size: int = doc("Items per encoder forward.", 32, at_least=1)
    num_workers: int = doc(
        "Input worker processes per rank that read images, render prompts and collate while the model runs "
        "(encoding, mining, reranker pairs, teacher scores); 0 = in-process; -1 = auto: min(4, the rank's cores - 1) "
        "on CUDA; on CPU the cores run.cpu_threads leaves free (none at torch's default, where the forward uses every "
        "core), for sets of 8 batches or more.", -1, at_least=-1
    )
    shard_size: int = doc("Items per cached fp16 shard (the unit of resume and of rank sharding).", 50_000, at_least=1)
    cache_dir: str = doc("Embedding cache; empty = $UMARVEL_CACHE/embeddings or ~/.cache/umarvel/embeddings.", "")
    use_gpu: Literal["auto", "yes", "no"] = doc("FAISS search on GPUs: auto = when faiss sees any.", "auto")


@dataclass
class MBEIREvalConfig:
    split: Literal["test", "val"] = doc("Query split to evaluate.", "test")
    rows: list[str] = doc("Evaluation rows (e.g. mscoco_task0); empty = all 16.", factory=list)
    top_k: int = doc("Candidates kept per query (run files; at least the largest recall cut-off).", 50, at_least=1)
    pools: list[Literal["local", "global"]] = doc(
        "Pools to evaluate: local (each row its own pool), global (the union of all 16); `umarvel eval mbeir "
        "--pool` overrides it.", factory=lambda: ["local"]
    )


@dataclass
class ZeroShotEvalConfig:
    tasks: list[str] = doc("Zero-shot sets to evaluate (`umarvel eval zeroshot --task`); empty = all.", factory=list)
    data: str = doc("Directory holding each zero-shot set in its public release's layout (`--data` overrides it).", "")
    visdial_caption: bool = doc(
        "VisDial queries start with the image's caption; off = the question/answer rounds only, as the official "
        "evaluation that gave the paper's 70.3 R@1.", False
    )


@dataclass
class EvalConfig:
    mbeir: MBEIREvalConfig = doc("M-BEIR: split, rows, kept candidates, pools.", factory=MBEIREvalConfig)
    zeroshot: ZeroShotEvalConfig = doc("The paper's zero-shot sets (Tables 8 and 9).", factory=ZeroShotEvalConfig)


# Keys of the flat `eval:` section before encoding and benchmark settings were split: still read,
# each as the key it became (a file giving both spellings of one key is an error).
MOVED_KEYS = {
    "eval.batch_size": "encode.batch_size",
    "eval.shard_size": "encode.shard_size",
    "eval.cache_dir": "encode.cache_dir",
    "eval.use_gpu": "encode.use_gpu",
    "eval.num_workers": "encode.num_workers",
    "eval.split": "eval.mbeir.split",
    "eval.rows": "eval.mbeir.rows",
    "eval.top_k": "eval.mbeir.top_k",
}


@dataclass
class MineConfig:
    queries: str = doc("Query file relative to the M-BEIR root; empty = the union train file.", "")
    pool: str = doc("Candidate pool relative to the root; empty = the union train pool.", "")
    scope: Literal["union", "task"] = doc(
        "Search the whole pool, or only the candidates of the query's dataset and task modality.", "union"
    )
    depth: int = doc("Candidates retrieved per query before positives and filtered ones are removed.", 100, at_least=1)
    top_k: int = doc("Hard negatives kept per query (the survivors with the highest scores).", 20, at_least=1)
    threshold: float = doc(
        "Drop candidates scoring above this cosine as likely false negatives (paper 3.2.2); >= 1 = off: no score is "
        "compared, so fp32 duplicates at 1.0000001 stay. Place it against the stats' top-1 negative quantiles.", 0.9
    )
    max_fraction_of_positive: float = doc(
        "Also drop candidates scoring above this fraction of the query's best positive score (0 = off): a per-query "
        "ceiling that follows tasks whose cosines sit higher or lower than others.", 0.0,
        at_least=0,
    )


@dataclass
class RerankConfig:
    recall_model: str = doc(
        "Recall embedder (run, adapter or merged directory) whose top-N per query become the YES/NO pairs.", ""
    )
    top_n: int = doc("Candidates the recall model retrieves per training query (paper: 50, or 100).", 50, at_least=1)
    negatives_per_positive: int = doc(
        "NO pairs drawn (seeded) from a query's top-N non-positives per YES pair; 0 = all of them (paper).", 0,
        at_least=0,
    )
    max_queries: int = doc("Training queries drawn (seeded) from data.train_queries; 0 = every query.", 0, at_least=0)


@dataclass
class DistillConfig:
    recall_model: str = doc(
        "Recall embedder (run, adapter or merged directory) that retrieves the candidates and gives S_recall; "
        "empty = model.backbone, the stage-2 model the student starts from.", ""
    )
    reranker: str = doc("Reranker run or model directory that gives S_rerank = P(YES).", "")
    fraction: float = doc("Share of the distinct training queries drawn (seeded by run.seed) for distillation (paper: 0.1).",
                        0.1, above=0, at_most=1)
    sample: Literal["per_task", "uniform"] = doc(
        "How the fraction is drawn: per_task = within each (dataset, task), floor(fraction x its queries) but at "
        "least one, as the official code; uniform = over all queries at once.", "per_task"
    )
    top_k: int = doc("Retrieved candidates per query besides its positive (paper: 49, so 50 in all).", 49, at_least=1)
    alpha: float = doc("Teacher fusion weight a: S = a*S_recall + (1-a)*S_rerank.", 0.5, at_least=0, at_most=1)
    teacher_temperature: float = doc(
        "Softmax scale of the teacher scores; 0 = the student's temperature at each step (detached), so that "
        "with alpha=1 the teacher is the recall model's own distribution.", 0.0,
        at_least=0,
    )
    teacher_file: str = doc("Teacher-score file; empty = <run.output_dir>/teacher.jsonl (work files in <file>.work/).", "")
    shard_size: int = doc("Queries per reranker scoring shard (the unit of resume and of rank sharding).", 1000, at_least=1)


@dataclass
class RunConfig:
    output_dir: str = doc("Run directory: resolved config, logs, checkpoints, metrics, DONE marker.", "runs/default")
    seed: int = doc("Seed for every random choice of the run.", 42)
    cpu_threads: int = doc(
        "torch intra-op threads of each process for its work on the CPU (a model on the CPU, input preparation); "
        "0 = torch's default (one per core, or OMP_NUM_THREADS). A small model runs faster on 1 and keeps its pace "
        "on a busy machine: its ops are too short to share between cores (scripts/bench_threads.py).", 0, at_least=0
    )


@dataclass
class Config:
    model: ModelConfig = doc(
        "The model a stage trains: the embedder (the reranker in stage `reranker`).", factory=ModelConfig
    )
    data: DataConfig = doc("Training data of the stage.", factory=DataConfig)
    train: TrainConfig = doc("Optimisation and the loss.", factory=TrainConfig)
    encode: EncodeConfig = doc(
        "How item sets are encoded and searched: evaluation, mining, teacher retrieval, reranker pairs.",
        factory=EncodeConfig,
    )
    eval: EvalConfig = doc("Each benchmark's protocol settings.", factory=EvalConfig)
    mine: MineConfig = doc("Hard-negative mining.", factory=MineConfig)
    rerank: RerankConfig = doc("Reranker training pairs from a recall model (stage `reranker`).", factory=RerankConfig)
    distill: DistillConfig = doc("Stage 3: teacher scores from recall + reranker, then KL distillation.", factory=DistillConfig)
    run: RunConfig = doc("Where and how a run is recorded.", factory=RunConfig)
    stages: dict[str, Any] = doc(
        "Progressive sub-stages (nli, cc3m, mbeir) in order, each a partial config over this one.", factory=dict
    )

    def __post_init__(self):
        for name, partial in self.stages.items():
            if name not in PROGRESSIVE_STAGES:
                raise ConfigError(f"stages.{name}: unknown sub-stage; the progressive sub-stages are "
                                  f"{', '.join(PROGRESSIVE_STAGES)}")
            if not isinstance(partial, dict):
                raise ConfigError(f"stages.{name}: expected a mapping (a partial config), got {partial!r}")
            if "stages" in partial:
                raise ConfigError(f"stages.{name}.stages: sub-stages cannot have sub-stages")
            build_config(deep_merge(_without_stages(self), upgrade_moved_keys(partial, f"stages.{name}")),
                         f"stages.{name}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless YAML quirks."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if isinstance(value, bool) and {"yes", "no"} <= set(args):  # YAML 1.1 reads yes/no as booleans
            value = "yes" if value else "no"
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            raise ConfigError(f"{path}: unknown key; {where or 'the top level'} accepts {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    obj = cls(**kwargs)
    check_values(obj, where)
    return obj


def check_values(obj: Any, where: str = "") -> None:
    """Every number field within its declared range, then the section's own `check()` (fields
    that constrain each other); errors name the key and what it accepts."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        bounds, value = f.metadata.get("range"), getattr(obj, f.name)
        # NaN passes every comparison with a bound, and no setting means anything at infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is not a finite number"
                              + (f"; it must be {bounds}" if bounds is not None else ""))
        if bounds is not None and isinstance(value, (int, float)) and not bounds.admits(value):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is out of range; it must be {bounds}")
    for key, message in obj.check() if hasattr(obj, "check") else []:
        raise ConfigError(f"{prefix}{key}: {message}")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def _without_stages(config: "Config") -> dict:
    return {k: v for k, v in to_dict(config).items() if k != "stages"}


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving `inherit:` (a path or list of paths relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: inherit cycle through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = yaml_text(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err, text)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    data = upgrade_moved_keys(data, str(path))
    parents = data.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = deep_merge(merged, read_yaml(path.parent / parent, _seen + (path,)))
    return deep_merge(merged, data)


def yaml_text(path: Path) -> str:
    """A YAML file's text, decoded as UTF-8 (what YAML files are; not the locale's encoding)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text at byte {err.start} (line {line}): {err.reason}; "
                          "save it as UTF-8") from None


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """A YAML error in one line: where (line and column, 1-based) and what; PyYAML's own text
    spans several lines and names the file as "<unicode string>"."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context else ""
        return f"{where}{err.problem}{context}"
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        return f"line {line}, column {column}: character #x{err.character:04x}: {err.reason}"
    return " ".join(str(err).split())


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. model.lora.r=16")
    key, raw = assignment.split("=", 1)
    parts = _moved_key(key.strip()).split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return data


def read_raw(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """The unvalidated mapping: YAML file (with inherits) <- `--set` overrides."""
    data = read_yaml(path) if path else {}
    for assignment in overrides or []:
        data = apply_override(data, assignment)
    return data


def upgrade_moved_keys(data: dict, where: str = "config") -> dict:
    """`data` (a raw config, or a sub-stage's partial one) with every key of MOVED_KEYS under
    the name it moved to, in its sub-stages too; a copy, `data` is left unchanged."""
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        *old_path, old_key = old.split(".")
        parent = _section(data, old_path)
        if not isinstance(parent, dict) or old_key not in parent:
            continue
        *new_path, new_key = new.split(".")
        target = _section(data, new_path, create=True)
        if new_key in target and target[new_key] != parent[old_key]:
            raise ConfigError(f"{where}: {old} is the old name of {new}; give only {new}")
        target[new_key] = parent.pop(old_key)
        if not parent:  # a section left empty by the move would read as "given, all defaults"
            _section(data, old_path[:-1]).pop(old_path[-1])
    stages = data.get("stages")
    if isinstance(stages, dict):
        for name, partial in stages.items():
            if isinstance(partial, dict):
                stages[name] = upgrade_moved_keys(partial, f"{where}: stages.{name}")
    return data


def _moved_key(key: str) -> str:
    """An override's key under its current name (`stages.NAME.` prefixes kept)."""
    parts = key.split(".")
    prefix = ".".join(parts[:2]) + "." if len(parts) > 2 and parts[0] == "stages" else ""
    rest = key[len(prefix):]
    return prefix + MOVED_KEYS.get(rest, rest)


def _section(data: dict, path: list[str], create: bool = False):
    for part in path:
        if not isinstance(data, dict):
            return None
        if create and not isinstance(data.get(part), dict):
            data[part] = {}
        data = data.get(part)
    return data


def build_config(data: dict, where: str = "config", cls: type = Config) -> Any:
    """Validate a raw mapping into `cls`; errors name `where` and the key's path."""
    if cls is Config:
        data = upgrade_moved_keys(data, where)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Defaults <- YAML file (with inherits) <- `--set` overrides, validated into `cls`; a full
    config's run.cpu_threads then applies to this process (every command loads its config here)."""
    config = build_config(read_raw(path, overrides), str(path) if path else "config", cls)
    if cls is Config:
        from umarvel.process import use_cpu_threads

        use_cpu_threads(config.run.cpu_threads)
    return config


def save_config(config: Any, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config into a run directory (atomically) as config.yaml."""
    from umarvel.io import atomic_write_text

    target = Path(run_dir) / "config.yaml"
    atomic_write_text(target, yaml.safe_dump(to_dict(config), sort_keys=False))
    return target


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field: the reference printed by `umarvel config`."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((key, "", f.metadata.get("doc", "")))
            rows.extend(describe(tp, key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = f.metadata.get("range")
            text = f.metadata.get("doc", "") + (f" Range: {bounds}." if bounds else "")
            rows.append((key, json.dumps(default), text))
    return rows
