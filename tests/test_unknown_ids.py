"""An id < 0 means "unknown" in the false-negative mask and never matches, not even another
unknown id: items without a document id (NLI sentences, the -1 padding of query_positives)
must stay in every softmax. Hand computation on the 3-query example of test_losses.py."""
from math import exp, log

import pytest
import torch

from umarvel.training.losses import CandidateIds, info_nce

TAU = 0.5
# similarity = QUERIES @ POSITIVES.T = [[0.6, 0.0, 0.8], [0.8, 1.0, 0.0], [0.0, 0.0, 0.6]]
QUERIES = torch.eye(3, dtype=torch.float64)
POSITIVES = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6]], dtype=torch.float64)
# query i . its own negative = 0 for every i; shared, query . negative k = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
NEGATIVES = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], dtype=torch.float64)
UNKNOWN = torch.tensor([-1, -1, -1])

IN_BATCH = (  # query -> candidate, nothing masked
    log(exp(1.2) + exp(0.0) + exp(1.6)) - 1.2,
    log(exp(1.6) + exp(2.0) + exp(0.0)) - 2.0,
    log(exp(0.0) + exp(0.0) + exp(1.2)) - 1.2,
)
REVERSE = (  # candidate -> query, nothing masked
    log(exp(1.2) + exp(1.6) + exp(0.0)) - 1.2,
    log(exp(0.0) + exp(2.0) + exp(0.0)) - 2.0,
    log(exp(1.6) + exp(0.0) + exp(1.2)) - 1.2,
)
OWN_NEGATIVE = (  # plus each query's own negative, similarity 0 for all three
    log(exp(1.2) + exp(0.0) + exp(1.6) + exp(0.0)) - 1.2,
    log(exp(1.6) + exp(2.0) + exp(0.0) + exp(0.0)) - 2.0,
    log(exp(0.0) + exp(0.0) + exp(1.2) + exp(0.0)) - 1.2,
)


def mean(values):
    return sum(values) / len(values)


def test_id_less_positives_mask_nothing():
    ids = CandidateIds(positive=UNKNOWN)
    assert info_nce(QUERIES, POSITIVES, TAU, ids=ids).loss.item() == pytest.approx(mean(IN_BATCH), abs=1e-12)
    both = info_nce(QUERIES, POSITIVES, TAU, ids=ids, bidirectional=True).loss.item()
    assert both == pytest.approx(mean(IN_BATCH) + mean(REVERSE), abs=1e-12)


def test_id_less_negatives_do_not_match_the_padding_of_query_positives():
    ids = CandidateIds(
        positive=torch.tensor([7, 8, 9]),
        negatives=torch.tensor([[-1], [-1], [-1]]),
        query_positives=torch.tensor([[7, -1], [8, -1], [9, -1]]),
    )
    own = info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES, negatives_scope="own", ids=ids).loss.item()
    assert own == pytest.approx(mean(OWN_NEGATIVE), abs=1e-12)
    shared = info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES, negatives_scope="global", ids=ids)
    unmasked = info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES, negatives_scope="global")
    assert shared.loss.item() == pytest.approx(unmasked.loss.item(), abs=1e-12)


def test_known_ids_are_still_masked_beside_unknown_ones():
    # queries 0 and 1 share document 7; query 2 has no id
    ids = CandidateIds(positive=torch.tensor([7, 7, -1]))
    expected = mean([
        log(exp(1.2) + exp(1.6)) - 1.2,  # column 1 is document 7 too
        log(exp(2.0) + exp(0.0)) - 2.0,  # column 0 is document 7 too
        IN_BATCH[2],
    ])
    assert info_nce(QUERIES, POSITIVES, TAU, ids=ids).loss.item() == pytest.approx(expected, abs=1e-12)
