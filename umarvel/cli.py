"""The `umarvel` command: parse, load the config, call one function per verb.

Each verb is a `_cmd_<verb>(args)` function registered in `build_parser`; heavy imports happen
inside the verb so `umarvel --help` stays instant.
"""
from __future__ import annotations

import argparse
import sys

from umarvel.errors import UmarvelError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (may `inherit:` others)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.lora.r=16 (repeatable)",
    )


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from umarvel.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, family=args.family)
    print(f"tiny {args.family} model written to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from umarvel.config import describe, load_config, to_dict

    if args.config or args.overrides:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
        return 0
    for key, default, text in describe():
        print(f"{key:42s} {default:>14s}  {text}" if default else f"\n[{key}]  {text}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from umarvel.data.synthetic import write_synthetic

    root = write_synthetic(args.out, seed=args.seed, size=args.size)
    print(f"synthetic benchmark ({args.size}, seed {args.seed}) written: M-BEIR at {root}, "
          f"NLI and CC3M beside it in {args.out}")
    return 0


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from umarvel.data.validate import validate

    report = validate(args.data, images=args.images, emit=lambda err: print(err, file=sys.stderr))
    if not report.ok:
        print(f"umarvel: {len(report.errors)} problem(s) found in {args.data}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"\n{args.data}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umarvel",
        description="Train and evaluate universal multimodal retrievers the U-MARVEL way.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    p = verbs.add_parser("make-tiny-model", help="build a tiny random Qwen2-VL for tests and the demo")
    p.add_argument("--out", required=True, help="directory to write the model, tokenizer and processor")
    p.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    p.add_argument("--family", choices=["qwen2-vl", "qwen2.5-vl"], default="qwen2-vl")
    p.set_defaults(func=_cmd_make_tiny_model)

    p = verbs.add_parser("config", help="print the config reference, or the resolved config of --config/--set")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    data = verbs.add_parser("data", help="datasets: write the synthetic benchmark, validate a directory")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="DATA_VERB")
    data_verbs.required = True
    p = data_verbs.add_parser("synth", help="write a small learnable M-BEIR-shaped benchmark (+ NLI, CC3M)")
    p.add_argument("--out", required=True, help="directory to write M-BEIR/, nli_for_simcse.csv and cc3m/ into")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    p.add_argument("--size", choices=["tiny", "small", "medium"], default="small")
    p.set_defaults(func=_cmd_data_synth)
    p = data_verbs.add_parser("validate", help="check an M-BEIR root (or a data dir holding M-BEIR/); report every problem")
    p.add_argument("--data", required=True, help="M-BEIR root, or a directory with M-BEIR/, nli_for_simcse.csv, cc3m/")
    p.add_argument("--images", choices=["open", "exists", "skip"], default="open",
                   help="image check: open with PIL (default), only check they exist, or only check paths")
    p.set_defaults(func=_cmd_data_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UmarvelError as err:
        print(f"umarvel: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
