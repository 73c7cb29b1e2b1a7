"""The training losses: InfoNCE over cosine similarity, and KL distillation from a teacher.

Inputs are L2-normalised embeddings, so a dot product is the cosine similarity; logits are
similarity / temperature, computed in at least float32. The temperature is a 0-dim tensor
(it may require grad; the embedder owns and clamps it) or a float.

InfoNCE layout (every rank holds B local queries; `gather` makes the global batch of size G):
  query -> candidates: local query i (global index o+i, o = this rank's offset) is scored
  against the columns [all G positives | extra negatives]; its target is column o+i.
  Extra negatives, K per query, come in one of two scopes:
    "own":    query i sees only its own K negatives      -> columns [G positives | K]
    "global": query i sees every negative of the batch   -> columns [G positives | G*K],
              ordered query-major (query 0's K, then query 1's K, ...).
  candidate -> queries (bidirectional, paper stage 1b): local positive j is scored against
  all G queries of the global batch; its target is query o+j. Extra negatives never act as
  anchors of this direction. The two directions are summed with weight 1 each, as in the
  reference implementation.
False negatives: with `ids`, a column whose document id is a positive of query i (other than
i's own target column) is removed from i's softmax; in the reverse direction, a query of
whom positive j is a positive is removed from j's softmax. MSCOCO has five captions per
image, so two queries of one batch often share a positive.
An NLI `hard_neg` is an extra negative with K = 1.

Gradient accumulation does not add negatives: the contrastive batch is what one step sees
(across ranks). For larger batches use GradCache (`umarvel.training.gradcache`).

Each loss returns `layout.loss_scale * sum of per-query losses` (see
`umarvel.training.distributed`): the rank-averaged gradient equals the gradient of the mean
loss over the global batch, and the rank-averaged loss value equals that mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from umarvel.training.distributed import RankLayout, gather, rank_layout

NegativesScope = Literal["own", "global"]


@dataclass
class LossOutput:
    """The loss to backpropagate and detached scalars for logging (local to this rank)."""

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


@dataclass
class CandidateIds:
    """Integer document ids for false-negative masking; an id < 0 means unknown (never matches).

    positive:        [B]    id of the positive sampled for each query
    negatives:       [B, K] ids of the extra negatives (needed when negatives are given)
    query_positives: [B, P] ids of every positive of each query, padded with -1; defaults to
                     `positive[:, None]` (enough when duplicates share an id, as in MSCOCO)
    """

    positive: torch.Tensor
    negatives: torch.Tensor | None = None
    query_positives: torch.Tensor | None = None

    def positives_of_queries(self) -> torch.Tensor:
        return self.positive[:, None] if self.query_positives is None else self.query_positives


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    negatives: torch.Tensor | None = None,
    negatives_scope: NegativesScope = "own",
    bidirectional: bool = False,
    ids: CandidateIds | None = None,
    in_batch_negatives: bool = True,
) -> LossOutput:
    """InfoNCE of local queries against the global batch (see the module docstring).

    query, positive: [B, D]; negatives: [B, K, D] or query-major [B*K, D]. With
    `in_batch_negatives` False a query sees only its own positive and its own K negatives (paper
    Table 5, "top-k hard negatives only"): the other queries' positives are masked out of its
    softmax and, whatever `negatives_scope`, their negatives are not in it.
    """
    if negatives_scope not in ("own", "global"):
        raise ValueError(f"negatives_scope must be 'own' or 'global', got {negatives_scope!r}")
    if not in_batch_negatives and (negatives is None or bidirectional):
        raise ValueError("in_batch_negatives=False needs extra negatives and a one-directional loss")
    if not in_batch_negatives:
        negatives_scope = "own"  # top-k only: nothing of another query, its negatives included
    batch, dim = query.shape
    if positive.shape != query.shape:
        raise ValueError(f"positive has shape {tuple(positive.shape)}, expected {tuple(query.shape)}")
    if negatives is not None:
        negatives = _at_least_float32(_per_query(negatives, batch, dim, "negatives"))
    if ids is not None:
        _check_ids(ids, batch, negatives)
    layout = rank_layout(batch, query.device)
    query, positive = _at_least_float32(query), _at_least_float32(positive)
    targets = torch.arange(batch, device=query.device) + layout.offset

    similarity = _query_to_candidate_similarity(query, gather(positive, layout), negatives, negatives_scope, layout)
    false_negatives = in_batch = None
    if ids is not None:
        query_positives = ids.positives_of_queries()
        in_batch = _is_positive_of(query_positives, gather(ids.positive, layout)[None])
        blocks = [in_batch]
        if negatives is not None and negatives_scope == "own":
            blocks.append(_is_positive_of(query_positives, ids.negatives))
        elif negatives is not None:
            blocks.append(_is_positive_of(query_positives, gather(ids.negatives, layout).flatten()[None]))
        false_negatives = _without_targets(torch.cat(blocks, dim=1), targets)
    if not in_batch_negatives:
        others = torch.zeros_like(similarity, dtype=torch.bool)
        others[:, : layout.total] = True
        others = _without_targets(others, targets)
        false_negatives = others if false_negatives is None else false_negatives | others

    per_query = _cross_entropy(similarity, temperature, targets, false_negatives)
    loss = per_query.sum() * layout.loss_scale
    stats = _retrieval_stats(similarity, targets, false_negatives)
    stats["loss_query_to_candidate"] = per_query.detach().mean()

    if bidirectional:
        reverse_similarity = positive @ gather(query, layout).T
        reverse_false_negatives = None
        if in_batch is not None:
            queries_sharing = gather(in_batch, layout)[:, layout.offset : layout.offset + batch].T
            reverse_false_negatives = _without_targets(queries_sharing, targets)
        reverse = _cross_entropy(reverse_similarity, temperature, targets, reverse_false_negatives)
        loss = loss + reverse.sum() * layout.loss_scale
        stats["loss_candidate_to_query"] = reverse.detach().mean()

    stats["temperature"] = torch.as_tensor(temperature).detach().float()
    return LossOutput(loss=loss, stats=stats)


def distillation_kl(
    query: torch.Tensor,
    candidates: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    teacher_temperature: float,
) -> LossOutput:
    """KL(softmax(teacher / teacher_temperature) || softmax(student / temperature)) per query.

    Each query has its own list of C candidates (paper stage 3: the positive and its top-k
    retrieved candidates); the student score is the cosine similarity query . candidate.
    query: [B, D]; candidates: [B, C, D] or query-major [B*C, D]; teacher_scores: [B, C]
    (the fused recall/rerank score). No gathering: the lists are per query. Averaged over
    the global batch like `info_nce`.
    """
    batch, dim = query.shape
    candidates = _at_least_float32(_per_query(candidates, batch, dim, "candidates"))
    if teacher_scores.shape != candidates.shape[:2]:
        raise ValueError(
            f"teacher_scores has shape {tuple(teacher_scores.shape)}, expected {tuple(candidates.shape[:2])}"
        )
    layout = rank_layout(batch, query.device)
    student = torch.einsum("bd,bcd->bc", _at_least_float32(query), candidates) / temperature
    student_log_probs = F.log_softmax(student, dim=1)
    teacher_log_probs = F.log_softmax(_at_least_float32(teacher_scores) / teacher_temperature, dim=1)
    per_query = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(dim=1)
    stats = {
        "kl": per_query.detach().mean(),
        "top1_agreement": (student.argmax(1) == teacher_scores.argmax(1)).float().mean(),
        "temperature": torch.as_tensor(temperature).detach().float(),
    }
    return LossOutput(loss=per_query.sum() * layout.loss_scale, stats=stats)


def _query_to_candidate_similarity(
    query: torch.Tensor,
    all_positives: torch.Tensor,
    negatives: torch.Tensor | None,
    negatives_scope: NegativesScope,
    layout: RankLayout,
) -> torch.Tensor:
    """[B, G (+ K or G*K)] similarities in the column layout of the module docstring."""
    blocks = [query @ all_positives.T]
    if negatives is not None and negatives_scope == "own":
        blocks.append(torch.einsum("bd,bkd->bk", query, negatives))
    elif negatives is not None:
        blocks.append(query @ gather(negatives, layout).flatten(0, 1).T)
    return torch.cat(blocks, dim=1)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 embeddings are scored in float32; float64 (tests) stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _per_query(candidates: torch.Tensor, batch: int, dim: int, name: str) -> torch.Tensor:
    """[B, K, D] view of per-query candidates given as [B, K, D] or query-major [B*K, D]."""
    if candidates.dim() == 2 and candidates.shape[1] == dim and candidates.shape[0] % batch == 0:
        return candidates.view(batch, candidates.shape[0] // batch, dim)
    if candidates.dim() == 3 and candidates.shape[0] == batch and candidates.shape[2] == dim:
        return candidates
    raise ValueError(f"{name} has shape {tuple(candidates.shape)}; expected [{batch}, K, {dim}] or [{batch}*K, {dim}]")


def _check_ids(ids: CandidateIds, batch: int, negatives: torch.Tensor | None) -> None:
    if ids.positive.shape != (batch,):
        raise ValueError(f"ids.positive has shape {tuple(ids.positive.shape)}, expected ({batch},)")
    positives = ids.positives_of_queries()
    if positives.dim() != 2 or positives.shape[0] != batch:
        raise ValueError(f"ids.query_positives has shape {tuple(positives.shape)}, expected ({batch}, P)")
    if negatives is None:
        return
    if ids.negatives is None or ids.negatives.shape != negatives.shape[:2]:
        shape = None if ids.negatives is None else tuple(ids.negatives.shape)
        raise ValueError(f"ids.negatives has shape {shape}, expected {tuple(negatives.shape[:2])} like the negatives")


def _is_positive_of(query_positives: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """[B, C] bool: candidate c's id is among query b's positive ids.

    candidate_ids is [B, C] (per-query candidates) or [1, C] (shared columns). Loops over
    the P positive slots so memory stays B*C.
    """
    known = candidate_ids >= 0
    hits = torch.zeros(query_positives.shape[0], candidate_ids.shape[1], dtype=torch.bool, device=known.device)
    for slot in query_positives.T:
        hits |= (slot[:, None] == candidate_ids) & known
    return hits


def _without_targets(mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The false-negative mask with each row's own target column kept in the softmax."""
    mask = mask.clone()
    mask[torch.arange(mask.shape[0], device=mask.device), targets] = False
    return mask


def _cross_entropy(
    similarity: torch.Tensor,
    temperature: torch.Tensor | float,
    targets: torch.Tensor,
    false_negatives: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row cross-entropy of similarity / temperature, false negatives left out."""
    logits = similarity / temperature
    if false_negatives is not None:
        logits = logits.masked_fill(false_negatives, float("-inf"))
    return F.cross_entropy(logits, targets, reduction="none")


def _retrieval_stats(
    similarity: torch.Tensor, targets: torch.Tensor, false_negatives: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """In-batch top-1 accuracy, mean positive similarity and mean hardest-negative similarity."""
    similarity = similarity.detach()
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    excluded = torch.zeros_like(similarity, dtype=torch.bool) if false_negatives is None else false_negatives
    ranked = similarity.masked_fill(excluded, float("-inf"))
    negatives_only = ranked.clone()
    negatives_only[rows, targets] = float("-inf")
    return {
        "accuracy": (ranked.argmax(dim=1) == targets).float().mean(),
        "positive_similarity": similarity[rows, targets].mean(),
        "hardest_negative_similarity": negatives_only.max(dim=1).values.mean(),
    }


__all__ = ["CandidateIds", "LossOutput", "NegativesScope", "distillation_kl", "info_nce"]
