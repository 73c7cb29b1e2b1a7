"""Reranker data: YES/NO training pairs, their file, and the collator that makes model inputs.

A training pair names a query, one candidate and the answer the reranker should give:
    {"qid": "9:1", "did": "9:17", "answer": "NO"}
The pairs of a reranker run are written once into its run directory (`pairs.jsonl`, a header
line with the parameters, then one pair per line), so every rank of a launched job, and a
resumed run, trains on exactly the pairs rank 0 retrieved.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from umarvel.backbones import Family
from umarvel.config import PromptConfig
from umarvel.data.collator import encode_batch, load_image
from umarvel.data.mbeir import CandidatePool, Queries, sample_rng
from umarvel.data.prompts import render_pair
from umarvel.errors import DataError, UmarvelError
from umarvel.io import atomic_path

ANSWERS = ("YES", "NO")
PAIRS_FORMAT = "umarvel-rerank-pairs"
FORMAT_VERSION = 1
IGNORED_LABEL = -100


def answer_token_ids(tokenizer) -> dict[str, int]:
    """The token the model emits first when it answers YES, and when it answers NO.

    Qwen2's vocabulary holds both words as single tokens; a tokenizer that splits them (the
    tiny test one does) is scored on their first tokens, which must then differ.
    """
    ids = {answer: tokenizer(answer, add_special_tokens=False)["input_ids"][0] for answer in ANSWERS}
    if ids["YES"] == ids["NO"]:
        raise UmarvelError(f"the tokenizer starts 'YES' and 'NO' with the same token {ids['YES']}: cannot tell them apart")
    return ids


@dataclass(frozen=True)
class RerankPair:
    qid: str
    did: str
    answer: str


def write_pairs(path: str | os.PathLike, pairs: list[RerankPair], params: dict) -> None:
    """The pairs file (atomically): a header line, then one pair per line."""
    with atomic_path(path) as tmp, open(tmp, "w") as out:
        out.write(json.dumps({"format": PAIRS_FORMAT, "version": FORMAT_VERSION, "params": params}) + "\n")
        for pair in pairs:
            out.write(json.dumps(asdict(pair)) + "\n")


def read_pairs(path: str | os.PathLike) -> list[RerankPair]:
    file = str(path)
    with open(path, encoding="utf-8") as handle:
        try:
            header = json.loads(next(handle, "{}"))
        except ValueError:
            header = {}
        if not isinstance(header, dict) or (header.get("format"), header.get("version")) != (PAIRS_FORMAT, FORMAT_VERSION):
            raise DataError(f"not a version-{FORMAT_VERSION} {PAIRS_FORMAT} file", file, 1)
        pairs = []
        for line, text in enumerate(handle, 2):
            try:
                record = json.loads(text)
                pair = RerankPair(str(record["qid"]), str(record["did"]), record["answer"])
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"bad pair: {err}", file, line) from None
            if pair.answer not in ANSWERS:
                raise DataError(f"answer must be one of {ANSWERS}, got {pair.answer!r}", file, line, "answer")
            pairs.append(pair)
    return pairs


class RerankTrainSet(torch.utils.data.Dataset):
    """Pairs -> {"query", "candidate", "answer"} items; the query's instruction is drawn per
    sample and epoch from a seeded rng, as in contrastive training."""

    def __init__(self, pairs: list[RerankPair], queries: Queries, pool: CandidatePool, *, seed: int = 0,
                 use_instruction: bool = True):
        self.pairs, self.queries, self.pool = pairs, queries, pool
        self.seed, self.use_instruction, self.epoch = seed, use_instruction, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        pair = self.pairs[index]
        row = self.queries.find(pair.qid)
        if row is None:
            raise DataError(f"reranker pair {index} names query '{pair.qid}', which is not in {self.queries.file}")
        query = self.queries.item(row, rng=sample_rng(self.seed, self.epoch, index), use_instruction=self.use_instruction)
        candidate = self.pool.get(pair.did, needed_by=f"reranker pair {index} (query {pair.qid})")
        return {"query": query, "candidate": candidate, "answer": pair.answer}


class RerankCollator:
    """(query, candidate[, answer]) examples -> processor inputs for the reranker.

    With answers, each row gets its answer's first token appended after the assistant prompt,
    and `labels` is IGNORED_LABEL everywhere but there: the loss is the next-token loss of the
    answer alone. Rows are right-padded, so the appended token goes at each row's own length.
    """

    def __init__(self, processor, prompt: PromptConfig, family: Family, answer_ids: dict[str, int]):
        if processor.tokenizer.padding_side != "right":
            raise UmarvelError("the reranker collator needs a right-padding tokenizer (see backbone.load_processor)")
        self.processor, self.prompt, self.family, self.answer_ids = processor, prompt, family, answer_ids

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        rendered = [render_pair(e["query"], e["candidate"], self.prompt, self.family.chat, tokenizer) for e in examples]
        images = [load_image(image, self.prompt, self.family) for r in rendered for image in r.images]
        batch, _ = encode_batch(self.processor, rendered, images)
        if "answer" in examples[0]:
            answers = torch.tensor([self.answer_ids[e["answer"]] for e in examples])
            batch = append_answers(batch, answers, tokenizer.pad_token_id)
        return batch


def append_answers(batch: dict[str, torch.Tensor], answers: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Put answers[i] right after row i's last real token; label only that position."""
    rows = torch.arange(len(answers))
    ends = batch["attention_mask"].sum(dim=1)
    widened = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in batch:
            value = batch[key]
            fill = pad_id if key == "input_ids" else 0
            widened[key] = torch.cat([value, value.new_full((len(value), 1), fill)], dim=1)
    widened["input_ids"][rows, ends] = answers
    widened["attention_mask"][rows, ends] = 1
    labels = torch.full_like(widened["input_ids"], IGNORED_LABEL)
    labels[rows, ends] = answers
    return {**batch, **widened, "labels": labels}
