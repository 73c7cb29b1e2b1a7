"""The `umarvel` command: parse, load the config, call one function per verb.

Each verb is a `_cmd_<verb>(args)` function registered in `build_parser`; heavy imports happen
inside the verb so `umarvel --help` stays instant.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from umarvel.errors import UmarvelError, system_error_message
from umarvel.progress import quiet_library_bars


DATA_HELP = "the M-BEIR root, or the data directory holding M-BEIR/ (as `umarvel data synth` writes it)"
SYNTH_SIZES = ("tiny (4 test queries per row, 14 candidates per pool), small (24 and 80; the default), "
               "medium (60 and 300; clearer differences between stages, slower)")
# Shown under each command's --help; tests parse every line, so they cannot go stale.
EXAMPLES = {
    "umarvel make-tiny-model": ["umarvel make-tiny-model --out checkpoints/tiny-qwen2vl",
                                "umarvel make-tiny-model --out checkpoints/tiny-qwen3vl --family qwen3-vl",
                                "umarvel make-tiny-model --out checkpoints/tiny-release --layout umarvel-release"],
    "umarvel train": [
        "umarvel train --stage progressive --config configs/tiny/progressive.yaml",
        "umarvel train --stage hardneg --config configs/umarvel/hardneg.yaml --set train.per_device_batch_size=32",
    ],
    "umarvel distill": ["umarvel distill --config configs/tiny/distill.yaml"],
    "umarvel mine-negatives": [
        "umarvel mine-negatives --model runs/tiny/progressive/mbeir --data data/synthetic --out runs/tiny/hardneg.jsonl "
        "--config configs/tiny/mine.yaml",
    ],
    "umarvel eval": ["umarvel eval mbeir --pool both --model runs/tiny/distill --data data/synthetic --output-dir runs/tiny/eval"],
    "umarvel eval mbeir": [
        "umarvel eval mbeir --pool both --model runs/tiny/distill --data data/synthetic --output-dir runs/tiny/eval",
        "umarvel eval mbeir --model runs/umarvel/distill --data data/M-BEIR --output-dir runs/umarvel/eval-plus "
        "--rerank runs/umarvel/plus-reranker --cache-dir /scratch/umarvel-embeddings",
        "umarvel eval mbeir --pool both --profile umarvel-release --model checkpoints/U-MARVEL-Qwen2VL-7B-Instruct "
        "--data data/M-BEIR --output-dir runs/release/eval",
    ],
    "umarvel eval zeroshot": [
        "umarvel eval zeroshot --task all --model runs/umarvel/distill --data data/zeroshot --output-dir runs/umarvel/zeroshot",
        "umarvel eval zeroshot --model runs/tiny/distill --data data/zeroshot --output-dir runs/tiny/zeroshot "
        "--set encode.batch_size=64",
        "umarvel eval zeroshot --task flickr,circo --model runs/umarvel/distill --data data/zeroshot "
        "--output-dir runs/umarvel/zeroshot-plus --rerank runs/umarvel/plus-reranker --rerank-top-k 10 --alpha 0.9091",
    ],
    "umarvel eval mmeb": [
        "umarvel eval mmeb --model runs/umarvel/distill --data data/mmeb --output-dir runs/umarvel/mmeb",
        "umarvel eval mmeb --model runs/tiny/distill --data data/mmeb --output-dir runs/tiny/mmeb "
        "--subset ImageNet-1K MSCOCO_t2i --set encode.batch_size=64",
    ],
    "umarvel export": [
        "umarvel export --format sentence-transformers --model runs/tiny/distill runs/tiny/st-model",
        "umarvel export --format sentence-transformers --model runs/umarvel/distill exports/umarvel-st "
        "--prompt caption='Retrieve an image that matches the caption.'",
    ],
    "umarvel index": ["umarvel index build --model runs/tiny/distill --corpus my-corpus.jsonl --out indexes/my-corpus"],
    "umarvel index build": [
        "umarvel index build --model runs/tiny/distill --corpus my-corpus.jsonl --out indexes/my-corpus",
        "umarvel index build --model runs/umarvel/distill --corpus data/M-BEIR/cand_pool/global/mbeir_union_test_cand_pool.jsonl "
        "--out indexes/mbeir-global --index-type IVF16384,Flat --search-params nprobe=64",
        "umarvel index build --model runs/umarvel/distill --corpus photos/ --out indexes/photos --index-type HNSW32 "
        "--search-params efSearch=128",
    ],
    "umarvel search": [
        "umarvel search --index indexes/my-corpus --query 'a red circle' -k 5",
        "umarvel search --index indexes/photos --image query.jpg --instruction 'Find a similar photo.' --json",
    ],
    "umarvel serve": [
        "umarvel serve --index indexes/my-corpus",
        "umarvel serve --index indexes/photos --host 0.0.0.0 --port 8080 --max-k 100 --max-batch 64",
    ],
    "umarvel demo": ["umarvel demo", "umarvel demo --out /tmp/umarvel-demo --size tiny",
                     "umarvel demo --out /tmp/umarvel-demo-qwen3vl --family qwen3-vl"],
    "umarvel config": ["umarvel config", "umarvel config --config configs/tiny/hardneg.yaml --set train.epochs=2"],
    "umarvel data": ["umarvel data synth --out data/synthetic", "umarvel data validate --data data/synthetic"],
    "umarvel data synth": ["umarvel data synth --out data/synthetic --size medium --seed 1"],
    "umarvel data validate": ["umarvel data validate --data data/M-BEIR", "umarvel data validate --data data --images exists",
                              "umarvel data validate --data data/M-BEIR --allow-symlinks-outside-root"],
}


def _add_index_loading_args(parser: argparse.ArgumentParser) -> None:
    """How `search` and `serve` load an index: its model, where that runs, where the index is searched."""
    parser.add_argument("--model", help="model to encode queries with (default: the one the manifest names; its "
                        "fingerprint must match the index's)")
    parser.add_argument("--device", help="device of the model, e.g. cuda:0 or cpu (default: the model's settings)")
    parser.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto",
                        help="put a Flat or IVF index on every GPU faiss sees, in fp16 shards (auto: when there are any)")
    parser.add_argument("--search-params", metavar="PARAMS", help="faiss search parameters instead of the index's, "
                        "e.g. nprobe=64 or efSearch=256")


def _add_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", metavar="DIR",
        help="embedding cache (fp16 vectors, re-used across runs; ~40 GB for the 7B global pool); "
        "default encode.cache_dir, else $UMARVEL_CACHE/embeddings or ~/.cache/umarvel/embeddings",
    )


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (may `inherit:` others)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.lora.r=16 (repeatable)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished run (of the same config) from its latest checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="delete the run directory's contents and train again (a finished run is otherwise "
                        "skipped, and one of another config refused)")


def _add_rerank_args(parser: argparse.ArgumentParser, alpha_rule: str) -> None:
    """U-MARVEL+'s options, the same for every benchmark; `alpha_rule` says how auto is decided there."""
    parser.add_argument("--rerank", metavar="PATH", help="U-MARVEL+: re-score each query's top-k with this reranker "
                        "(a reranker run or model directory)")
    parser.add_argument("--rerank-top-k", type=_positive_int, default=50, metavar="K",
                        help="candidates per query to re-score (default 50)")
    parser.add_argument("--alpha", type=_fusion_weight, default="auto", metavar="A|auto",
                        help=f"fusion weight a of S = a*S_recall + (1-a)*S_rerank; {alpha_rule}")


def _add_profile_arg(parser: argparse.ArgumentParser) -> None:
    from umarvel import profiles

    parser.add_argument("--profile", choices=list(profiles.PROFILES),
                        help="embedding profile (model.profile; default: the saved one, else umarvel); "
                        "umarvel-release embeds as the released checkpoints' official inference")


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from umarvel.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, family=args.family, layout=args.layout)
    print(f"tiny {args.family} model ({args.layout} layout) written to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from umarvel.config import MOVED_KEYS, describe, load_config, to_dict

    if args.config or args.overrides:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
        return 0
    for key, default, text in describe():
        print(f"{key:42s} {default:>14s}  {text}" if default else f"\n[{key}]  {text}")
    print("\n[moved keys]  still read (in files and --set) under their new names; a file giving both is an error")
    for old, new in MOVED_KEYS.items():
        print(f"{old:42s} -> {new}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from umarvel.data.synthetic import write_synthetic

    root = write_synthetic(args.out, seed=args.seed, size=args.size)
    print(f"synthetic benchmark ({args.size}, seed {args.seed}) written: M-BEIR at {root}, "
          f"NLI and CC3M beside it in {args.out}")
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from umarvel.data.images import set_max_pixels
    from umarvel.data.validate import validate

    set_max_pixels(args.max_image_pixels)
    report = validate(args.data, images=args.images, symlinks_outside_root=args.allow_symlinks_outside_root,
                      emit=lambda err: print(err, file=sys.stderr))
    if not report.ok:
        print(f"umarvel: {len(report.errors)} problem(s) found in {args.data}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"\n{args.data}: OK")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from umarvel.training.registry import run_stage

    _setup_logging()
    from umarvel import process

    for run_dir in run_stage(args.stage, args.config, args.overrides, resume=args.resume, force=args.force):
        if process.is_main_process():
            print(f"finished: {run_dir}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    args.stage = "distill"
    return _cmd_train(args)


@contextlib.contextmanager
def _launched_embedder(args: argparse.Namespace):
    """(config, embedder) for an encoding verb, inside the launcher's process group if any;
    each rank encodes on its own device."""
    from umarvel.config import load_config
    from umarvel.launcher import launched_job
    from umarvel.modeling.embedder import load_for_inference

    from umarvel.data.images import set_max_pixels

    config = load_config(args.config, args.overrides)
    if args.cache_dir:
        config.encode.cache_dir = args.cache_dir
    set_max_pixels(config.data.max_image_pixels)
    with launched_job() as device:
        if device:
            config.model.device = device
        yield config, load_for_inference(args.model, _given_model(args, config))


def _given_model(args: argparse.Namespace, config):
    """The model settings given for this command, raw and by origin (model_dir.GivenSettings):
    the config file's model section; `--set model.*`, --profile and the device (the launcher's
    rank device, else the configured one) as given now."""
    from umarvel.config import read_raw
    from umarvel.modeling.model_dir import GivenSettings

    file = (read_raw(args.config).get("model") or {}) if args.config else {}
    command = read_raw(None, args.overrides).get("model") or {}
    if args.profile:
        command["profile"] = args.profile
    return GivenSettings(file=file, command={**command, "device": config.model.device})


def _cmd_eval_mbeir(args: argparse.Namespace) -> int:
    from umarvel.evaluation.mbeir import POOLS, MBEIREvaluator, report_dir, selected_rows

    _setup_logging()
    with _launched_embedder(args) as (config, embedder):
        settings = config.eval.mbeir
        pools = tuple(settings.pools) if args.pool is None else POOLS if args.pool == "both" else (args.pool,)
        if args.rerank:
            evaluator = _rerank_evaluator(args, embedder, config)
        else:
            evaluator = MBEIREvaluator(embedder, args.data, config.encode, settings,
                                       symlinks_outside_root=config.data.allow_symlinks_outside_root)
        results = evaluator.evaluate(selected_rows(settings.rows), pools, args.output_dir)
    for pool, rows in results.items():
        average = sum(r.headline for r in rows) / len(rows)
        print(f"{pool}: average {average:.2f} over {len(rows)} rows -> {report_dir(args.output_dir, pool)}")
        if args.rerank:
            how = "chosen on the val queries" if args.alpha == "auto" else "given"
            print(f"{pool}: U-MARVEL+ top {args.rerank_top_k} re-scored, S = a*S_recall + (1-a)*S_rerank "
                  f"with a = {evaluator.alphas[pool]:.2f} ({how})")
    return 0


def _cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from umarvel.evaluation.runner import Runner

    _setup_logging()
    if args.rerank:
        from umarvel.evaluation.rerank import RerankingRunner, check_rerankable, given_alpha

        alpha = given_alpha(args.alpha)  # before the model loads
    with _launched_embedder(args) as (config, embedder):
        settings = config.eval.zeroshot
        tasks = _zeroshot_tasks(args.task or ",".join(settings.tasks) or "all")
        data = args.data or settings.data
        if not data:
            raise UmarvelError("umarvel eval zeroshot needs --data DIR (or eval.zeroshot.data): the directory "
                               "holding each set in its public release's layout")
        links = config.data.allow_symlinks_outside_root
        benchmarks = {name: cls(Path(data), settings, symlinks_outside_root=links) for name, cls in tasks.items()}
        if args.rerank:
            for benchmark in benchmarks.values():  # every set is checked before the first is evaluated
                check_rerankable(benchmark)
            runner = RerankingRunner(embedder, _given_reranker(args, config), config.encode, top_k=args.rerank_top_k,
                                     alpha=alpha)
        else:
            runner = Runner(embedder, config.encode)
        results = {name: runner.run(benchmark, Path(args.output_dir) / name) for name, benchmark in benchmarks.items()}
    for name, metrics in results.items():
        if metrics is not None:
            shown = ", ".join(f"{metric} {value:.2f}" for metric, value in metrics.items())
            print(f"{name}: {shown} -> {Path(args.output_dir) / name}")
    if args.rerank and any(metrics is not None for metrics in results.values()):
        print(f"U-MARVEL+: each search's top {args.rerank_top_k} re-scored, S = a*S_recall + (1-a)*S_rerank "
              f"with a = {alpha:.2f} (given)")
    return 0


def _cmd_eval_mmeb(args: argparse.Namespace) -> int:
    from pathlib import Path

    from umarvel.config import load_config
    from umarvel.evaluation.mmeb import MMEB, averages
    from umarvel.evaluation.runner import Runner

    _setup_logging()
    # Every row is read and checked before the model loads: a bad file fails in seconds, not after a 7B load.
    config = load_config(args.config, args.overrides)
    benchmark = MMEB(Path(args.data), args.subset, symlinks_outside_root=config.data.allow_symlinks_outside_root)
    with _launched_embedder(args) as (config, embedder):
        metrics = Runner(embedder, config.encode).run(benchmark, Path(args.output_dir))
    if metrics is not None:
        print("MMEB hit@1: " + ", ".join(f"{name} {metrics[name]:.2f}" for name in benchmark.subsets))
        groups = averages({name: metrics[name] for name in benchmark.subsets})
        print("averages: " + ", ".join(f"{group} {value:.2f} ({present} of {total})"
                                       for group, (value, present, total) in groups.items()))
        print(f"score files, predictions and results.json/md/png -> {args.output_dir}")
    return 0


def _zeroshot_tasks(names: str) -> dict[str, type]:
    """The benchmark classes of `names` (comma-separated, or all) from the zero-shot registry."""
    from umarvel.evaluation.zeroshot import TASKS

    wanted = list(TASKS) if names == "all" else [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in TASKS]
    if unknown:
        raise UmarvelError(f"unknown zero-shot task {', '.join(unknown)}; the tasks are {', '.join(TASKS)} (or all)")
    return {name: TASKS[name] for name in wanted}


def _given_reranker(args: argparse.Namespace, config):
    """The --rerank model, given the same model settings as the embedder."""
    import dataclasses

    from umarvel.modeling.reranker import Reranker

    given = _given_model(args, config)
    # `--set model.backbone` is where the embedder's adapter finds its backbone, not the reranker's;
    # the embedder's attention (bidirectional in configs/umarvel/base.yaml) is not the reranker's,
    # which always reads causally.
    given = dataclasses.replace(given, file={k: v for k, v in given.file.items() if k != "attention"},
                                command={k: v for k, v in given.command.items() if k not in ("backbone", "attention")})
    return Reranker.from_pretrained(args.rerank, given=given)


def _rerank_evaluator(args: argparse.Namespace, embedder, config):
    """U-MARVEL+: the evaluator whose top-k are re-scored by the --rerank model and fused."""
    from umarvel.evaluation.rerank import RerankingEvaluator

    return RerankingEvaluator(embedder, _given_reranker(args, config), args.data, config.encode, config.eval.mbeir,
                              top_k=args.rerank_top_k, alpha=args.alpha,
                              symlinks_outside_root=config.data.allow_symlinks_outside_root)


def _fusion_weight(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        alpha = float(value)
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {value!r}")
    return alpha


def _positive_int(value: str) -> int:
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def _cmd_mine_negatives(args: argparse.Namespace) -> int:
    from umarvel.retrieval.mining import format_stats, mine

    _setup_logging()
    with _launched_embedder(args) as (config, embedder):
        summary = mine(embedder, args.data, args.out, config.mine, config.encode,
                       symlinks_outside_root=config.data.allow_symlinks_outside_root)
    if summary:
        print(format_stats(summary))
        print(f"hard negatives -> {args.out} (statistics in {args.out}.stats.json)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from umarvel.config import load_config
    from umarvel.export.to_sentence_transformers import export_sentence_transformers
    from umarvel.modeling.embedder import load_for_inference

    config = load_config(args.config, args.overrides)
    embedder = load_for_inference(args.model, _given_model(args, config))
    out = export_sentence_transformers(embedder, args.out, dict(args.prompts))
    print(f"sentence-transformers model -> {out}; load it with SentenceTransformer({str(out)!r}, "
          "trust_remote_code=True) (umarvel installed)")
    return 0


def _named_prompt(value: str) -> tuple[str, str]:
    name, equals, text = value.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=TEXT, got {value!r}")
    return name.strip(), text


def _cmd_index_build(args: argparse.Namespace) -> int:
    from umarvel.serving.corpus import open_corpus
    from umarvel.serving.index_store import build_index

    _setup_logging()
    with _launched_embedder(args) as (config, embedder):
        corpus = open_corpus(args.corpus, args.image_root, symlinks_outside_root=config.data.allow_symlinks_outside_root)
        manifest = build_index(embedder, corpus, args.out, model=args.model, encode_config=config.encode,
                               index_type=args.index_type, search_params=args.search_params)
    if manifest is not None:
        print(f"{manifest.index_type} index of {manifest.count} items (dim {manifest.dim}, model fingerprint "
              f"{manifest.fingerprint}) -> {args.out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from umarvel.retrieval.index import gpu_choice
    from umarvel.serving import Retriever

    if not args.query and not args.image:
        raise UmarvelError("umarvel search needs --query TEXT, --image PATH or both")
    query = {"text": args.query, "image": args.image, "instruction": args.instruction}
    retriever = Retriever.load(args.index, model=args.model, device=args.device, use_gpu=gpu_choice(args.use_gpu),
                               search_params=args.search_params)
    hits = retriever.search({key: value for key, value in query.items() if value}, k=args.k)
    if args.json:
        print(json.dumps([asdict(hit) for hit in hits], ensure_ascii=False))
        return 0
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:3d}  {hit.score:.4f}  {hit.id}  {json.dumps(hit.metadata, ensure_ascii=False)}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from umarvel.serving.http import create_app
    except ImportError as err:
        raise UmarvelError(f"umarvel serve needs the serve extra ({err.name} is not installed): "
                           "pip install -e \".[serve]\"") from None
    from umarvel.retrieval.index import gpu_choice
    from umarvel.serving import Retriever
    from umarvel.serving.limits import Limits

    retriever = Retriever.load(args.index, model=args.model, device=args.device, use_gpu=gpu_choice(args.use_gpu),
                               search_params=args.search_params)
    limits = Limits(max_request_bytes=args.max_request_mb * 2**20, max_image_pixels=args.max_image_pixels,
                    max_k=args.max_k, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    print(f"serving {args.index} ({len(retriever)} items) on http://{args.host}:{args.port}: POST /search, "
          "POST /encode, GET /health (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(retriever, limits), host=args.host, port=args.port, log_level="info")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from umarvel.demo import run_demo

    _setup_logging()
    run_demo(args.out, size=args.size, seed=args.seed, family=args.family)
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    from umarvel import backbones, profiles
    from umarvel.config import DataConfig
    from umarvel.training.registry import STAGES

    parser = argparse.ArgumentParser(
        prog="umarvel",
        description="Train and evaluate universal multimodal retrievers the U-MARVEL way.",
    )
    # The deepspeed launcher passes --local_rank=N before the verb; the rank is read from the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    p = verbs.add_parser("make-tiny-model", help="build a tiny random backbone for tests and the demo")
    p.add_argument("--out", required=True, help="directory to write the model, tokenizer and processor")
    p.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    p.add_argument("--family", choices=backbones.names(), default=backbones.DEFAULT,
                   help=f"the backbone family the tiny model has the architecture of (default {backbones.DEFAULT})")
    p.add_argument("--layout", choices=list(profiles.LAYOUTS), default=profiles.DEFAULT,
                   help="umarvel (default), or umarvel-release: laid out as the released U-MARVEL checkpoints "
                   "(flat transformers-4.45 config, padded vocabulary, sim.temp, unused lm_head)")
    p.set_defaults(func=_cmd_make_tiny_model)

    p = verbs.add_parser("train", help="run a training stage (progressive NLI -> CC3M -> M-BEIR, or one stage)")
    p.add_argument("--stage", required=True, choices=list(STAGES), metavar="STAGE",
                   help="; ".join(f"{name}: {stage.help}" for name, stage in STAGES.items()))
    _add_config_args(p)
    _add_run_args(p)
    p.set_defaults(func=_cmd_train)

    p = verbs.add_parser("distill", help="stage 3: score teacher lists with recall + reranker, then distil them "
                         "into the stage-2 embedder (KL)")
    _add_config_args(p)
    _add_run_args(p)
    p.set_defaults(func=_cmd_distill)

    p = verbs.add_parser("mine-negatives", help="mine filtered hard negatives with a stage-1 model")
    p.add_argument("--model", required=True, help="run directory, adapter directory or merged checkpoint")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="the hard-negative file to write (jsonl with a header line)")
    _add_profile_arg(p)
    _add_cache_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_mine_negatives)

    p = verbs.add_parser("export", help="write a trained embedder for another library (sentence-transformers)")
    p.add_argument("--format", required=True, choices=["sentence-transformers"],
                   help="sentence-transformers: a directory SentenceTransformer(OUT, trust_remote_code=True) loads")
    p.add_argument("--model", required=True, help="run directory, adapter directory or merged checkpoint")
    p.add_argument("out", metavar="OUT", help="the directory to write (an earlier export there is replaced)")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], type=_named_prompt, metavar="NAME=TEXT",
                   help="a named prompt (an instruction, masked out of the pool), beside the empty query and "
                   "document ones (repeatable)")
    _add_profile_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_export)

    p = verbs.add_parser("eval", help="evaluate an embedder")
    benchmarks = p.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks.required = True
    p = benchmarks.add_parser("mbeir", help="M-BEIR recall on the local and/or global (union) pool")
    p.add_argument("--pool", choices=["local", "global", "both"],
                   help="local: each row searches its own candidate pool; global: every row searches the union of "
                   "all 16 pools (5.6M candidates on M-BEIR); both; default eval.mbeir.pools (local)")
    p.add_argument("--model", required=True, help="run directory, adapter directory, merged checkpoint or backbone")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--output-dir", required=True, help="results.json/md/csv/png and run files go into its local/ and global/ folders")
    _add_profile_arg(p)
    _add_rerank_args(p, "auto (default) picks it on the val queries")
    _add_cache_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval_mbeir)
    p = benchmarks.add_parser("zeroshot", help="the paper's zero-shot sets (Tables 8 and 9), each from its public "
                              "release's layout")
    p.add_argument("--task", metavar="NAME|all", help="a task name, several comma-separated, or all; default "
                   "eval.zeroshot.tasks (empty: all)")
    p.add_argument("--model", required=True, help="run directory, adapter directory, merged checkpoint or backbone")
    p.add_argument("--data", help="directory holding the sets (default eval.zeroshot.data)")
    p.add_argument("--output-dir", required=True, help="results.json/md/png and run files go into its <task>/ folders")
    _add_profile_arg(p)
    _add_rerank_args(p, "the zero-shot sets have no split apart from the scored one, so auto (the default) is an "
                     "error: give a (the official evaluation's is 0.9091)")
    _add_cache_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval_zeroshot)
    p = benchmarks.add_parser("mmeb", help="MMEB's 36 image datasets (VLM2Vec's leaderboard), hit@1 per subset with "
                              "category, IND/OOD and overall averages")
    p.add_argument("--model", required=True, help="run directory, adapter directory, merged checkpoint or backbone")
    p.add_argument("--data", required=True, help="directory holding MMEB-eval/ (README.md, <Subset>/test-*.parquet) "
                   "and eval_images/")
    p.add_argument("--output-dir", required=True, help="<Subset>_score.json, <Subset>_pred.jsonl, run files and "
                   "results.json/md/png")
    p.add_argument("--subset", nargs="+", action="extend", metavar="NAME",
                   help="subsets to evaluate (repeatable); default every one of the 36 the README lists")
    _add_profile_arg(p)
    _add_cache_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval_mmeb)

    index = verbs.add_parser("index", help="search indexes of your own corpus")
    index_verbs = index.add_subparsers(dest="index_verb", metavar="INDEX_VERB")
    index_verbs.required = True
    p = index_verbs.add_parser("build", help="encode a corpus (jsonl of {id, text?, image?, instruction?} or an M-BEIR "
                               "pool) and write a FAISS index with its ids, metadata and manifest")
    p.add_argument("--model", required=True, help="run directory, adapter directory, merged checkpoint or backbone")
    p.add_argument("--corpus", required=True, metavar="FILE|DIR", help="a jsonl of items (one {\"id\", \"text\"?, "
                   "\"image\"?, \"instruction\"?, ...} object a line; other fields are kept as metadata), a directory "
                   "holding corpus.jsonl, or an M-BEIR candidate pool file")
    p.add_argument("--out", required=True, help="index directory to write (an existing index there is replaced when "
                   "the new one is complete)")
    p.add_argument("--index-type", default="Flat", metavar="FACTORY",
                   help="faiss factory string over inner product: Flat (exact, the default), IVF<lists>,Flat, "
                   "IVF<lists>,SQ8 or IVF<lists>,PQ<m>np (trained on a sample; np: no polysemous training, which "
                   "search never uses and which doubles the training), HNSW<M>; see BENCHMARKS.md for which at what "
                   "size")
    p.add_argument("--search-params", default="", metavar="PARAMS",
                   help="faiss search parameters stored with the index, e.g. nprobe=32 (IVF) or efSearch=128 (HNSW)")
    p.add_argument("--image-root", metavar="DIR", help="images resolve (and stay confined) under it; default the "
                   "corpus file's directory, or for an M-BEIR pool the directory above cand_pool/")
    _add_profile_arg(p)
    _add_cache_arg(p)
    _add_config_args(p)
    p.set_defaults(func=_cmd_index_build)

    p = verbs.add_parser("search", help="search an index built by `umarvel index build` with a text and/or image query")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--query", metavar="TEXT", help="query text")
    p.add_argument("--image", metavar="PATH", help="query image file")
    p.add_argument("--instruction", metavar="TEXT", help="task instruction leading the query (masked out of the pooling)")
    p.add_argument("-k", type=_positive_int, default=10, help="results to print (default 10)")
    p.add_argument("--json", action="store_true", help="print the hits as a JSON list of {id, score, metadata}")
    _add_index_loading_args(p)
    p.set_defaults(func=_cmd_search)

    p = verbs.add_parser("serve", help="an HTTP JSON search service over an index (POST /search, POST /encode, "
                         "GET /health; needs the serve extra)")
    p.add_argument("--index", required=True, help="index directory written by `umarvel index build`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    _add_index_loading_args(p)
    from umarvel.serving.limits import Limits

    defaults = Limits()
    p.add_argument("--max-k", type=_positive_int, default=defaults.max_k,
                   help=f"largest k a request may ask (default {defaults.max_k})")
    p.add_argument("--max-image-pixels", type=_positive_int, default=defaults.max_image_pixels,
                   help=f"largest image a request may send, in pixels (default {defaults.max_image_pixels})")
    p.add_argument("--max-request-mb", type=_positive_int, default=defaults.max_request_bytes // 2**20,
                   help=f"largest request body in MiB (default {defaults.max_request_bytes // 2**20})")
    p.add_argument("--max-batch", type=_positive_int, default=defaults.max_batch,
                   help=f"requests encoded together at most (default {defaults.max_batch}; 1 under a profile whose "
                   "vectors depend on their batch)")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help=f"how long the first waiting request waits for others to batch with (default "
                   f"{defaults.batch_wait_ms:g} ms)")
    p.set_defaults(func=_cmd_serve)

    p = verbs.add_parser("demo", help="the whole recipe end to end on CPU: tiny model, synthetic benchmark, report")
    p.add_argument("--out", default="umarvel-demo", help="working directory of the demo (re-runs re-use finished steps)")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="small",
                   help=f"synthetic benchmark size: {SYNTH_SIZES}")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights and of the synthetic data (runs keep their configs' run.seed)")
    p.add_argument("--family", choices=backbones.names(), default=backbones.DEFAULT,
                   help=f"the backbone family of the demo's tiny model (default {backbones.DEFAULT})")
    p.set_defaults(func=_cmd_demo)

    p = verbs.add_parser("config", help="print the config reference, or the resolved config of --config/--set")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    data = verbs.add_parser("data", help="datasets: write the synthetic benchmark, validate a directory")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="DATA_VERB")
    data_verbs.required = True
    p = data_verbs.add_parser("synth", help="write a small learnable M-BEIR-shaped benchmark (+ NLI, CC3M)")
    p.add_argument("--out", required=True, help="directory to write M-BEIR/, nli_for_simcse.csv and cc3m/ into")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="small", help=SYNTH_SIZES)
    p.set_defaults(func=_cmd_data_synth)
    p = data_verbs.add_parser("validate", help="check an M-BEIR root (or a data dir holding M-BEIR/); report every problem")
    p.add_argument("--data", required=True, help=DATA_HELP + "; nli_for_simcse.csv and cc3m/ beside M-BEIR/ are checked too")
    p.add_argument("--images", choices=["open", "exists", "skip"], default="open",
                   help="image check: decode fully with PIL (default), only check they exist, or only check paths")
    p.add_argument("--allow-symlinks-outside-root", action="store_true",
                   help="accept image symlinks that resolve outside the data root (training and eval then need "
                   "--set data.allow_symlinks_outside_root=true)")
    p.add_argument("--max-image-pixels", type=_positive_int, default=DataConfig.max_image_pixels,
                   help="refuse image files of more pixels than this (training and eval: --set data.max_image_pixels)")
    p.set_defaults(func=_cmd_data_validate)
    for choices in (verbs.choices, benchmarks.choices, data_verbs.choices, index_verbs.choices):
        for command in choices.values():
            command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[command.prog])
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _leave_process_group(code: int) -> int:
    """End a launched process without running interpreter shutdown next to live gloo threads.

    With functional collectives, a gloo worker thread can free a backward-time collective while
    Python finalises and abort the process (about 1 run in 20 on CPU), after all work is done.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return code
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _DeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" warning. We import DeepSpeed nowhere, but
    transformers does whenever it is installed (Trainer.__init__ and save_pretrained unwrap the
    model through accelerate, which imports it to know its engine class), and on a machine
    without CUDA every command then warned about a choice that is already ours: the CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_DEEPSPEED_CPU_NOTICE = _DeepSpeedCpuNotice()


def _require_config(args: argparse.Namespace) -> None:
    """Training verbs take their model, data and run directory from a config: without one the
    defaults (empty paths) fail later with a message about the symptom, not the cause."""
    if args.verb in ("train", "distill") and not args.config:
        raise UmarvelError(
            f"`umarvel {args.verb}` needs --config FILE: a run's model, data and output directory come from it. "
            "Start from configs/tiny/ (the CPU recipe, e.g. configs/tiny/progressive.yaml) or configs/umarvel/ "
            "(the paper's 7B recipe); `umarvel config` lists every key"
        )


def _interrupt_once() -> None:
    """The first Ctrl-C stops the command (KeyboardInterrupt, so files are left complete or not
    at all); a second one during the clean-up (DataLoader workers shutting down, a launcher's
    process group leaving) ends the process at once, without a traceback from the clean-up."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupted(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)


def _say(line: str) -> None:
    """Print the command's last line on a line of its own: the progress bars the error or the
    interrupt left open are closed first (each ends its line), instead of the line being
    appended to a bar."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(tqdm.tqdm._instances):
            bar.close()
    print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command (`run_command`), then leave a launcher's process group."""
    return _leave_process_group(run_command(argv))


def run_command(argv: list[str] | None = None) -> int:
    """Run one command and return its exit code; user errors (ours, and the system's: a full disk,
    a read-only directory, a file that is not UTF-8) end as one line and exit 2, Ctrl-C as one line
    and exit 130. Any other exception is a bug and keeps its traceback. A launched process may run
    several in a row: the process group stays."""
    try:
        _interrupt_once()
        args = build_parser().parse_args(argv)
        logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_CPU_NOTICE)  # before anything imports DeepSpeed
        quiet_library_bars()
        _require_config(args)
        code = args.func(args) or 0
    except UmarvelError as err:
        _say(f"umarvel: error: {err}")
        code = 2
    except BrokenPipeError:
        code = 0
    except KeyboardInterrupt:
        _say("umarvel: interrupted")
        code = 130
    except Exception as err:  # noqa: BLE001 - only the system's errors are caught; the rest re-raised
        message = system_error_message(err)
        if message is None:
            raise
        _say(f"umarvel: error: {message}")
        code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
