"""MMEB (Massive Multimodal Embedding Benchmark, VLM2Vec): the field's leaderboard, as a
benchmark of the evaluator protocol.

Each of the 36 image datasets (`DATASETS`: category and in/out-of-distribution split, the one
list of them) is a set of rows, one query and its own candidates, the positive first; a query
ranks its own candidates only (a per-query gallery). The headline is hit@1 per subset, averaged
per category, over the IND and OOD subsets and over all of them, as the leaderboard reports it.

Outputs, beside the shared run files: per subset `<Subset>_score.json` with the keys VLM2Vec's
evaluation writes (fractions, not percent) and `<Subset>_pred.jsonl` (each row's candidates by
index, best first, with scores); results.json/.md/.png with the category and overall averages.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from umarvel.errors import DataError, UmarvelError
from umarvel.evaluation.mmeb_layout import IMAGE_DIR, Subset, read_readme, read_subset
from umarvel.evaluation.protocol import Benchmark, ItemSet, Ranking, Retrieval
from umarvel.io import atomic_path, atomic_write_json, atomic_write_text

CATEGORIES = ("Classification", "VQA", "Retrieval", "Visual Grounding")
# name -> (category, split): the leaderboard's order; IND = the datasets VLM2Vec trains on.
DATASETS: dict[str, tuple[str, str]] = {
    "ImageNet-1K": ("Classification", "IND"), "N24News": ("Classification", "IND"),
    "HatefulMemes": ("Classification", "IND"), "VOC2007": ("Classification", "IND"),
    "SUN397": ("Classification", "IND"), "Place365": ("Classification", "OOD"),
    "ImageNet-A": ("Classification", "OOD"), "ImageNet-R": ("Classification", "OOD"),
    "ObjectNet": ("Classification", "OOD"), "Country211": ("Classification", "OOD"),
    "OK-VQA": ("VQA", "IND"), "A-OKVQA": ("VQA", "IND"), "DocVQA": ("VQA", "IND"),
    "InfographicsVQA": ("VQA", "IND"), "ChartQA": ("VQA", "IND"), "Visual7W": ("VQA", "IND"),
    "ScienceQA": ("VQA", "OOD"), "VizWiz": ("VQA", "OOD"), "GQA": ("VQA", "OOD"), "TextVQA": ("VQA", "OOD"),
    "VisDial": ("Retrieval", "IND"), "CIRR": ("Retrieval", "IND"), "VisualNews_t2i": ("Retrieval", "IND"),
    "VisualNews_i2t": ("Retrieval", "IND"), "MSCOCO_t2i": ("Retrieval", "IND"), "MSCOCO_i2t": ("Retrieval", "IND"),
    "NIGHTS": ("Retrieval", "IND"), "WebQA": ("Retrieval", "IND"), "FashionIQ": ("Retrieval", "OOD"),
    "Wiki-SS-NQ": ("Retrieval", "OOD"), "OVEN": ("Retrieval", "OOD"), "EDIS": ("Retrieval", "OOD"),
    "MSCOCO": ("Visual Grounding", "IND"), "RefCOCO": ("Visual Grounding", "OOD"),
    "RefCOCO-Matching": ("Visual Grounding", "OOD"), "Visual7W-Pointing": ("Visual Grounding", "OOD"),
}
GROUPS = (*CATEGORIES, "IND", "OOD", "Overall")
PUBLISHED_ROWS = 1000  # MMEB-eval's dataset card: 1,000 test rows in every subset
KS = (1, 5, 10)

# hit@1 (percent) of VLM2Vec-V1-Qwen2VL-7B per subset, from VLM2Vec's own score report
# experiments/public/all_scores/v2.0.1/VLM2Vec-V1-Qwen2VL-7B.json (TIGER-AI-Lab/VLM2Vec at 6e1e1d4),
# rounded to 0.1. Its averages here are means of these figures over the same subsets.
REFERENCE_MODEL = "VLM2Vec-V1-Qwen2VL-7B"
REFERENCE_SOURCE = ("TIGER-AI-Lab/VLM2Vec, experiments/public/all_scores/v2.0.1/VLM2Vec-V1-Qwen2VL-7B.json "
                    "(commit 6e1e1d4), hit@1")
REFERENCE: dict[str, float] = {
    "ImageNet-1K": 80.2, "N24News": 79.5, "HatefulMemes": 70.3, "VOC2007": 80.6, "SUN397": 77.3, "Place365": 37.2,
    "ImageNet-A": 57.6, "ImageNet-R": 74.2, "ObjectNet": 40.5, "Country211": 30.2, "OK-VQA": 56.8, "A-OKVQA": 47.5,
    "DocVQA": 88.8, "InfographicsVQA": 59.0, "ChartQA": 56.6, "Visual7W": 52.7, "ScienceQA": 38.2, "VizWiz": 39.6,
    "GQA": 54.4, "TextVQA": 71.6, "VisDial": 81.6, "CIRR": 51.4, "VisualNews_t2i": 80.3, "VisualNews_i2t": 81.2,
    "MSCOCO_t2i": 77.5, "MSCOCO_i2t": 73.6, "NIGHTS": 67.5, "WebQA": 88.3, "FashionIQ": 16.8, "Wiki-SS-NQ": 62.1,
    "OVEN": 66.6, "EDIS": 85.9, "MSCOCO": 75.4, "RefCOCO": 87.1, "RefCOCO-Matching": 84.4, "Visual7W-Pointing": 80.7,
}


def group_members(group: str) -> list[str]:
    """The datasets a category, IND, OOD or Overall averages over."""
    if group == "Overall":
        return list(DATASETS)
    position = 0 if group in CATEGORIES else 1
    return [name for name, labels in DATASETS.items() if labels[position] == group]


def averages(values: Mapping[str, float]) -> dict[str, tuple[float, int, int]]:
    """group -> (mean of the subsets present, how many are present, how many it has), for every
    group with at least one subset in `values`: the leaderboard's plain means of subset scores."""
    out = {}
    for group in GROUPS:
        members = group_members(group)
        present = [values[name] for name in members if name in values]
        if present:
            out[group] = (sum(present) / len(present), len(present), len(members))
    return out


def score_file(ranks: Sequence[int | None], num_data: int) -> dict[str, float | int]:
    """A subset's score file with VLM2Vec's keys, from each query's rank of its positive (1-based;
    None when past the last cut-off). One relevant candidate per query, so precision@k is
    hit@k/k, map@k and mrr@k are 1/rank, and both nDCG gains are 1/log2(rank + 1). `acc` and
    `num_correct` are the keys of VLM2Vec's V1 evaluation (acc = hit@1), read first by its
    score collector."""
    if not ranks:
        raise DataError("no queries to score")
    count = len(ranks)
    out: dict[str, float | int] = {}
    per_k = {}
    for k in KS:
        hits = [r is not None and r <= k for r in ranks]
        reciprocal = [1.0 / r if hit else 0.0 for r, hit in zip(ranks, hits)]
        gain = [1.0 / math.log2(r + 1) if hit else 0.0 for r, hit in zip(ranks, hits)]
        hit = sum(hits) / count
        per_k[k] = {"hit": hit, "ndcg_linear": sum(gain) / count, "ndcg_exponential": sum(gain) / count,
                    "precision": hit / k, "recall": hit,
                    "f1": sum(2.0 / (k + 1) for h in hits if h) / count,
                    "map": sum(reciprocal) / count, "mrr": sum(reciprocal) / count}
    for metric in ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr"):
        for k in KS:
            out[f"{metric}@{k}"] = per_k[k][metric]
    out["num_pred"] = count
    out["num_data"] = num_data
    out["acc"] = per_k[1]["hit"]
    out["num_correct"] = sum(r == 1 for r in ranks)
    return out


class MMEB(Benchmark):
    """MMEB's image subsets under `data_root` (MMEB-eval/ and eval_images/): all of the 36 the
    README lists, or `subsets`. Reading checks every row before anything is encoded."""

    name = "mmeb"

    def __init__(self, data_root: str | Path, subsets: Sequence[str] | None = None, *,
                 symlinks_outside_root: bool = False):
        self.root = Path(data_root)
        configs = read_readme(self.root)
        self.readme_configs = set(configs)
        if subsets:
            unknown = [name for name in subsets if name not in DATASETS]
            if unknown:
                raise UmarvelError(f"unknown MMEB subset {', '.join(unknown)}; the subsets are {', '.join(DATASETS)}")
            unlisted = [name for name in subsets if name not in configs]
            if unlisted:
                raise DataError(f"subset {', '.join(unlisted)} is not among the README's configs",
                                file=str(self.root / "MMEB-eval" / "README.md"), field="configs")
            wanted = [name for name in DATASETS if name in subsets]
        else:
            wanted = [name for name in DATASETS if name in configs]
            if not wanted:
                raise DataError(f"the README lists none of MMEB's 36 subsets ({', '.join(list(DATASETS)[:4])}, ...)",
                                file=str(self.root / "MMEB-eval" / "README.md"), field="configs")
        self.subsets: dict[str, Subset] = {
            name: read_subset(self.root, name, configs[name], symlinks_outside_root=symlinks_outside_root)
            for name in wanted
        }
        self.details: dict[str, dict] = {}

    @property
    def is_real_data(self) -> bool:
        """The published release: the README lists all 36 subsets and each evaluated one has its
        published row count (a fixture or a cut-down copy shows no reference numbers)."""
        return (set(DATASETS) <= self.readme_configs
                and all(len(s.queries) == PUBLISHED_ROWS for s in self.subsets.values()))

    def retrievals(self) -> list[Retrieval]:
        searches = []
        for name, subset in self.subsets.items():
            queries = ItemSet(f"mmeb-{name}-queries", [q["id"] for q in subset.queries], _Slice(subset.queries),
                              list(subset.files), images=_Images(self.root / IMAGE_DIR, subset.query_images))
            candidates = list(subset.candidates.values())
            candidate_set = ItemSet(f"mmeb-{name}-candidates", [c["id"] for c in candidates], _Slice(candidates),
                                    list(subset.files), images=_Images(self.root / IMAGE_DIR, subset.candidate_images))
            galleries = {q["id"]: keys for q, keys in zip(subset.queries, subset.rows)}
            searches.append(Retrieval(name, queries, candidate_set, k=max(KS), galleries=galleries))
        return searches

    def score(self, rankings: Mapping[str, Ranking]) -> dict[str, float]:
        """hit@1 (percent) per subset and per group; the score files' numbers and each row's
        ranking are kept for `write_report`."""
        metrics: dict[str, float] = {}
        for name, subset in self.subsets.items():
            if name not in rankings:
                raise DataError(f"no ranking for MMEB subset {name}")
            ranking = rankings[name]
            ranks, predictions = [], []
            for query, keys in zip(subset.queries, subset.rows):
                ranked = ranking.ids.get(query["id"])
                if ranked is None:
                    raise DataError(f"MMEB subset {name}: row {query['id']} has no ranking")
                ranks.append(ranked.index(keys[0]) + 1 if keys[0] in ranked else None)
                predictions.append(_prediction(int(query["id"]), keys, ranked, ranking.scores[query["id"]]))
            self.details[name] = {"score": score_file(ranks, len(subset.queries)), "predictions": predictions}
            metrics[name] = 100.0 * self.details[name]["score"]["hit@1"]
        for group, (value, _, _) in averages(metrics).items():
            metrics[group] = value
        return metrics

    def write_report(self, out_dir: Path, metrics: Mapping[str, float]) -> None:
        """`<Subset>_score.json` and `<Subset>_pred.jsonl` per subset, then results.json/.md/.png."""
        out_dir = Path(out_dir)
        for name, detail in self.details.items():
            atomic_write_json(out_dir / f"{name}_score.json", detail["score"])
            with atomic_path(out_dir / f"{name}_pred.jsonl") as tmp, open(tmp, "w") as handle:
                for prediction in detail["predictions"]:
                    handle.write(json.dumps(prediction) + "\n")
        write_results(out_dir, self, metrics)


def _prediction(row: int, keys: list[str], ranked: list[str], scores: list[float]) -> dict:
    """A row's candidates by their index in its lists, best first (a candidate listed at several
    indices gives all of them, in order), with scores; `label` is the positive's index, 0."""
    positions: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        positions.setdefault(key, []).append(index)
    order, values = [], []
    for key, score in zip(ranked, scores):
        order += positions[key]
        values += [round(score, 6)] * len(positions[key])
    return {"row": row, "prediction": order, "scores": values, "label": 0}


class _Slice:
    """`items(start, stop)` of a list of item dicts (picklable, for input workers)."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __call__(self, start: int, stop: int) -> list[dict]:
        return self.items[start:stop]


class _Images:
    """The image fingerprint of an item set: the files its items name under eval_images/."""

    def __init__(self, root: Path, paths: list[str]):
        self.root, self.paths = root, paths

    def __call__(self) -> str:
        from umarvel.retrieval.encode import images_fingerprint

        return images_fingerprint(self.root, self.paths)


NOT_PUBLISHED = (f"{REFERENCE_MODEL}'s numbers are not shown: this data is not the published MMEB (a README without "
                 f"all 36 subsets, or subsets without their {PUBLISHED_ROWS} rows), so nothing here compares to the "
                 "leaderboard.")


def write_results(out_dir: Path, benchmark: MMEB, metrics: Mapping[str, float]) -> None:
    """results.json, results.md and results.png: per subset hit@1/5/10, MRR@10 and nDCG@5, then the
    category, IND, OOD and overall averages; the reference model beside ours on the real data only."""
    from umarvel.evaluation.report import _bar_chart

    real = benchmark.is_real_data
    subsets = {}
    for name, detail in benchmark.details.items():
        score = detail["score"]
        category, split = DATASETS[name]
        subsets[name] = {"category": category, "split": split, "layout": benchmark.subsets[name].layout,
                         "queries": score["num_data"],
                         **{key: round(100.0 * score[key], 2) for key in ("hit@1", "hit@5", "hit@10", "mrr@10",
                                                                          "ndcg_linear@5")}}
    groups = {group: {"hit@1": round(value, 2), "subsets": present, "of": total}
              for group, (value, present, total) in averages({n: metrics[n] for n in subsets}).items()}
    reference = {name: REFERENCE[name] for name in subsets} if real else {}
    reference_groups = {group: value for group, (value, _, _) in averages(reference).items()}
    record = {"benchmark": "mmeb", "metric": "hit@1", "real_data": real, "subsets": subsets, "averages": groups}
    if real:
        record["reference"] = {"model": REFERENCE_MODEL, "source": REFERENCE_SOURCE, "subsets": reference,
                               "averages": {g: round(v, 2) for g, v in reference_groups.items()}}
    else:
        record["note"] = NOT_PUBLISHED
    atomic_write_json(out_dir / "results.json", record)

    extra = [f"{REFERENCE_MODEL} hit@1"] if real else []
    lines = ["# MMEB (hit@1 per subset; percent)", "",
             "| subset | category | split | queries | hit@1 | hit@5 | hit@10 | MRR@10 | nDCG@5 | "
             + "".join(f"{e} | " for e in extra),
             "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for name, row in subsets.items():
        cells = [f"{reference[name]:.1f}"] if real else []
        lines.append(f"| {name} | {row['category']} | {row['split']} | {row['queries']} | {row['hit@1']:.2f} | "
                     f"{row['hit@5']:.2f} | {row['hit@10']:.2f} | {row['mrr@10']:.2f} | {row['ndcg_linear@5']:.2f} | "
                     + "".join(f"{c} | " for c in cells))
    lines += ["", "| average | subsets | hit@1 | " + "".join(f"{e} | " for e in extra),
              "|---|---:|---:|" + "---:|" * len(extra)]
    for group, row in groups.items():
        cells = [f"{reference_groups[group]:.2f}"] if real else []
        lines.append(f"| {group} | {row['subsets']} of {row['of']} | {row['hit@1']:.2f} | "
                     + "".join(f"{c} | " for c in cells))
    lines.append("")
    partial = [g for g, row in groups.items() if row["subsets"] < row["of"]]
    if partial:
        lines.append(f"Averages over fewer subsets than the leaderboard's ({', '.join(partial)}) do not compare to "
                     "its numbers.")
    lines.append(f"Reference: {REFERENCE_SOURCE}; its averages are means of its subset figures."
                 if real else NOT_PUBLISHED)
    atomic_write_text(out_dir / "results.md", "\n".join(line.rstrip() for line in lines) + "\n")

    labels = [*subsets, *groups]
    series = [("ours", [subsets[n]["hit@1"] for n in subsets] + [groups[g]["hit@1"] for g in groups])]
    if real:
        series.append((REFERENCE_MODEL, [reference[n] for n in subsets] + [reference_groups[g] for g in groups]))
    _bar_chart(out_dir / "results.png", labels, series, "hit@1 (%)", "MMEB")
