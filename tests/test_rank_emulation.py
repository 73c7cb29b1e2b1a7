"""Rank offsets in one process: every rank of an uneven split runs as a thread, and the one
collective of `umarvel.training.distributed` (`_all_gather`) becomes an exchange between the
threads. In a single plain process every offset is 0, so without this only the slow torchrun
tests would notice a loss that targets column i instead of o+i, or a gather that drops the
wrong padding rows.

Checked against a hand computation on the global batch (loops over the docstring's column
layout): each rank's gathered tensors, its layout, its loss (= world/G x the sum of its
queries' losses) and its in-batch accuracy. Gradients across ranks stay with
test_distributed.py's 2-rank runs (the emulated gather passes no gradient between ranks).
"""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from umarvel.training import distributed
from umarvel.training.distributed import gather, rank_layout
from umarvel.training.losses import CandidateIds, info_nce

TAU = 0.1
G, K, D = 8, 2, 5
# Queries 0 and 4 share document 10, 2 and 3 share 12; query 5's second negative is
# document 11, query 1's positive. Query 6 has no id (-1).
POSITIVE_IDS = [10, 11, 12, 12, 10, 15, -1, 17]
NEGATIVE_IDS = [[20, 21], [22, 23], [24, 25], [26, 27], [28, 29], [30, 11], [32, -1], [34, 35]]
SPLITS = [(3, 5), (5, 3), (2, 1, 5)]


class EmulatedRanks:
    """`world` ranks as threads of this process (is_distributed, _rank and _all_gather patched)."""

    def __init__(self, monkeypatch, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.sent: list[torch.Tensor | None] = [None] * world
        self.thread = threading.local()
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)
        monkeypatch.setattr(distributed, "_rank", lambda: self.thread.rank)
        monkeypatch.setattr(distributed, "_all_gather", self.all_gather)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        rank = self.thread.rank
        self.sent[rank] = tensor
        self.barrier.wait()
        shapes = {tuple(t.shape) for t in self.sent}
        parts = [t if r == rank else t.detach().clone() for r, t in enumerate(self.sent)]
        self.barrier.wait()  # everyone has read before anyone sends again
        if len(shapes) != 1:
            raise RuntimeError(f"all_gather of different shapes {sorted(shapes)}")
        return torch.cat(parts)

    def run(self, function) -> list:
        """function(rank) on every rank at once; its results in rank order."""
        results, errors = [None] * self.world, []

        def target(rank):
            self.thread.rank = rank
            try:
                results[rank] = function(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("world, expected", [(1, False), (2, True), (3, True)])
def test_a_process_group_of_more_than_one_rank_is_distributed(monkeypatch, world, expected):
    """Else a 2-GPU run would contrast each rank's queries against its own candidates only."""
    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: world)
    assert distributed.is_distributed() is expected


def rows(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, D, generator=generator, dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(3)
    return {"query": unit(G, generator=generator), "positive": unit(G, generator=generator),
            "negative": unit(G, K, generator=generator)}


@pytest.mark.parametrize("sizes", SPLITS)
def test_every_rank_gathers_the_global_batch_in_rank_order(monkeypatch, sizes):
    values = torch.arange(G * 3, dtype=torch.float32).view(G, 3)
    flags = torch.tensor([True, False, False, True, True, False, True, False])
    ids = torch.tensor(NEGATIVE_IDS)

    def on_rank(rank):
        layout = rank_layout(sizes[rank])
        mine = rows(sizes, rank)
        return layout, gather(values[mine], layout), gather(flags[mine], layout), gather(ids[mine], layout)

    for rank, (layout, got_values, got_flags, got_ids) in enumerate(EmulatedRanks(monkeypatch, len(sizes)).run(on_rank)):
        assert (layout.sizes, layout.rank, layout.local) == (sizes, rank, sizes[rank])
        assert layout.offset == rows(sizes, rank).start
        assert layout.loss_scale == pytest.approx(len(sizes) / G)
        assert torch.equal(got_values, values)
        assert got_flags.dtype == torch.bool and torch.equal(got_flags, flags)
        assert torch.equal(got_ids, ids)


def hand_per_query(batch, scope, with_ids, bidirectional):
    """Per global query: loss of query g against [G positives | negatives], target column g,
    plus (bidirectional) positive g against the G queries, target g; false negatives out."""
    q, p, n = batch["query"], batch["positive"], batch["negative"]
    positive_ids = POSITIVE_IDS if with_ids else [-1] * G
    negative_ids = NEGATIVE_IDS if with_ids else [[-1] * K] * G
    losses = []
    for g in range(G):
        columns = [(float(q[g] @ p[c]), positive_ids[c]) for c in range(G)]
        owners = [g] if scope == "own" else range(G) if scope == "global" else []
        columns += [(float(q[g] @ n[h, k]), negative_ids[h][k]) for h in owners for k in range(K)]
        kept = [s for c, (s, did) in enumerate(columns) if c == g or did < 0 or did != positive_ids[g]]
        loss = math.log(sum(math.exp(s / TAU) for s in kept)) - float(q[g] @ p[g]) / TAU
        correct = all(s <= float(q[g] @ p[g]) for s in kept)
        if bidirectional:
            shared = positive_ids[g]
            kept = [float(p[g] @ q[h]) for h in range(G) if h == g or shared < 0 or positive_ids[h] != shared]
            loss += math.log(sum(math.exp(s / TAU) for s in kept)) - float(p[g] @ q[g]) / TAU
        losses.append((loss, correct))
    return losses


SCENARIOS = {
    "in_batch_bidirectional_ids": (None, True, True),
    "own_negatives_ids": ("own", True, False),
    "global_negatives_ids_bidirectional": ("global", True, True),
    "global_negatives_no_ids": ("global", False, False),
}


@pytest.mark.parametrize("sizes", SPLITS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_rank_targets_its_own_rows_of_the_global_batch(monkeypatch, batch, sizes, name):
    scope, with_ids, bidirectional = SCENARIOS[name]

    def on_rank(rank):
        mine = rows(sizes, rank)
        ids = CandidateIds(positive=torch.tensor(POSITIVE_IDS[mine]),
                           negatives=torch.tensor(NEGATIVE_IDS[mine]) if scope else None) if with_ids else None
        return info_nce(batch["query"][mine], batch["positive"][mine], TAU,
                        negatives=batch["negative"][mine] if scope else None, negatives_scope=scope or "own",
                        bidirectional=bidirectional, ids=ids)

    outputs = EmulatedRanks(monkeypatch, len(sizes)).run(on_rank)
    expected = hand_per_query(batch, scope, with_ids, bidirectional)
    for rank, output in enumerate(outputs):
        mine = expected[rows(sizes, rank)]
        assert output.loss.item() == pytest.approx(len(sizes) / G * sum(loss for loss, _ in mine), rel=1e-9)
        assert output.stats["accuracy"].item() == pytest.approx(sum(ok for _, ok in mine) / len(mine))
    # what DDP reports (the rank average) is the single-process loss of the whole batch
    average = sum(output.loss.item() for output in outputs) / len(sizes)
    assert average == pytest.approx(sum(loss for loss, _ in expected) / G, rel=1e-9)
