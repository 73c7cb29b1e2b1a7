"""A tiny seeded stand-in embedder and a global contrastive batch, shared by the loss tests
and their multi-process workers (so every process builds exactly the same model and data)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from umarvel.training.gradcache import embed_and_compute_loss
from umarvel.training.losses import CandidateIds, info_nce

FEATURES, DIM = 12, 6
TEMPERATURE = "temperature.log_temperature"  # the temperature's parameter name
GLOBAL_BATCH, NEGATIVES_PER_QUERY = 8, 2
# Positive document ids: queries 0 and 4 share document 10 (they sit on different ranks when
# the batch is split 4 + 4), queries 2 and 3 share document 12 (same rank).
POSITIVE_IDS = [10, 11, 12, 12, 10, 15, 16, 17]
# The second negative of query 5 is document 11, query 1's positive: a false negative for
# query 1 when negatives are shared across the batch.
NEGATIVE_IDS = [[20, 21], [22, 23], [24, 25], [26, 27], [28, 29], [30, 11], [32, 33], [34, 35]]


class LogTemperature(nn.Module):
    """exp(log t) with t = 0.1 at start: a module, as the embedder's temperature is (ZeRO-3
    gathers a partitioned parameter only inside its module's forward), learned in log space so
    its gradient has the scale of the others' and one absolute tolerance fits all."""

    def __init__(self):
        super().__init__()
        # Shape [1], not 0-dim: DeepSpeed 0.19.8's initial parameter broadcast views every
        # parameter as bytes, which fails for 0-dim tensors.
        self.log_temperature = nn.Parameter(torch.tensor([math.log(0.1)]))

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp().squeeze(0)


class StandInEmbedder(nn.Module):
    """Linear + tanh + dropout + linear + L2 normalisation, with a learnable temperature."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, DIM))
        with torch.no_grad():
            for parameter in self.encoder.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.temperature = LogTemperature()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(features), dim=-1)


def global_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random features for queries, positives and K negatives per query, plus their ids."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(GLOBAL_BATCH, FEATURES, generator=generator),
        "positive": torch.randn(GLOBAL_BATCH, FEATURES, generator=generator),
        "negative": torch.randn(GLOBAL_BATCH, NEGATIVES_PER_QUERY, FEATURES, generator=generator),
        "positive_ids": torch.tensor(POSITIVE_IDS),
        "negative_ids": torch.tensor(NEGATIVE_IDS),
    }


def shard(batch: dict[str, torch.Tensor], sizes: tuple[int, ...], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s rows of the global batch when rank r holds `sizes[r]` queries."""
    start = sum(sizes[:rank])
    return {key: value[start : start + sizes[rank]] for key, value in batch.items()}


@dataclass(frozen=True)
class Scenario:
    bidirectional: bool = False
    negatives_scope: str | None = None
    sizes: tuple[int, ...] = (4, 4)
    chunk_size: int | None = None


SCENARIOS = {
    "in_batch_bidirectional": Scenario(bidirectional=True),
    "own_negatives": Scenario(negatives_scope="own"),
    "global_negatives": Scenario(negatives_scope="global"),
    "uneven_global_negatives_bidirectional": Scenario(bidirectional=True, negatives_scope="global", sizes=(3, 5)),
    "gradcache_global_negatives_bidirectional": Scenario(bidirectional=True, negatives_scope="global", chunk_size=3),
    "gradcache_uneven_own_negatives": Scenario(negatives_scope="own", sizes=(5, 3), chunk_size=2),
}


def contrastive_loss(model: nn.Module, batch: dict[str, torch.Tensor], scenario: Scenario, encode=None):
    """The loss the way a Trainer's compute_loss builds it, through `embed_and_compute_loss`."""
    with_negatives = scenario.negatives_scope is not None
    inputs = {"query": {"features": batch["query"]}, "positive": {"features": batch["positive"]}}
    if with_negatives:
        inputs["negative"] = {"features": batch["negative"].flatten(0, 1)}
    ids = CandidateIds(positive=batch["positive_ids"], negatives=batch["negative_ids"] if with_negatives else None)

    def loss_fn(embeddings, temperature):
        return info_nce(
            embeddings["query"],
            embeddings["positive"],
            temperature,
            negatives=embeddings.get("negative"),
            negatives_scope=scenario.negatives_scope or "own",
            bidirectional=scenario.bidirectional,
            ids=ids,
        )

    encode = encode or (lambda chunk: model(chunk["features"]))
    return embed_and_compute_loss(
        encode,
        inputs,
        loss_fn,
        model.temperature(),
        chunk_size=scenario.chunk_size,
        parameters=model.parameters(),
    )


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def reference_gradients(scenario: Scenario) -> dict[str, torch.Tensor]:
    """One process, the whole global batch, no GradCache: what every distributed run must match."""
    model = StandInEmbedder()
    contrastive_loss(model, global_batch(), replace(scenario, chunk_size=None)).loss.backward()
    return gradients(model)


def max_difference(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> float:
    assert left.keys() == right.keys()
    return max(float((left[name] - right[name]).abs().max()) for name in left)
