"""InfoNCE and KL distillation against hand computation on small explicit tensors."""
from math import exp, log

import pytest
import torch

from umarvel.training.losses import CandidateIds, distillation_kl, info_nce

TAU = 0.5
# Queries are the unit vectors, so similarity[i][j] = positives[j][i]:
#   similarity = [[0.6, 0.0, 0.8],
#                 [0.8, 1.0, 0.0],
#                 [0.0, 0.0, 0.6]]      logits = similarity / 0.5
QUERIES = torch.eye(3, dtype=torch.float64)
POSITIVES = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6]], dtype=torch.float64)
# One extra negative per query; query . negative[k] = negative[k][i]:
#   [[0, 1, 0],
#    [0, 0, 1],
#    [1, 0, 0]]
NEGATIVES = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]], dtype=torch.float64)


def mean(values):
    return sum(values) / len(values)


def loss(**kwargs):
    return info_nce(QUERIES, POSITIVES, TAU, **kwargs).loss.item()


def test_query_to_candidate_with_in_batch_negatives():
    expected = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0)) - 2.0,
            log(exp(0.0) + exp(0.0) + exp(1.2)) - 1.2,
        ]
    )
    assert loss() == pytest.approx(expected, abs=1e-12)


def test_bidirectional_adds_each_positive_against_all_queries():
    query_to_candidate = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0)) - 2.0,
            log(exp(0.0) + exp(0.0) + exp(1.2)) - 1.2,
        ]
    )
    # positive j against the queries: column j of the similarity matrix, target row j
    candidate_to_query = mean(
        [
            log(exp(1.2) + exp(1.6) + exp(0.0)) - 1.2,
            log(exp(0.0) + exp(2.0) + exp(0.0)) - 2.0,
            log(exp(1.6) + exp(0.0) + exp(1.2)) - 1.2,
        ]
    )
    output = info_nce(QUERIES, POSITIVES, TAU, bidirectional=True)
    assert output.loss.item() == pytest.approx(query_to_candidate + candidate_to_query, abs=1e-12)
    assert output.stats["loss_candidate_to_query"].item() == pytest.approx(candidate_to_query, abs=1e-12)


def test_shared_positive_is_masked_out_of_both_directions():
    ids = CandidateIds(positive=torch.tensor([7, 7, 9]))
    query_to_candidate = mean(
        [
            log(exp(1.2) + exp(1.6)) - 1.2,  # column 1 is document 7 too
            log(exp(2.0) + exp(0.0)) - 2.0,  # column 0 is document 7 too
            log(exp(0.0) + exp(0.0) + exp(1.2)) - 1.2,
        ]
    )
    candidate_to_query = mean(
        [
            log(exp(1.2) + exp(0.0)) - 1.2,  # query 1 also has document 7 as positive
            log(exp(2.0) + exp(0.0)) - 2.0,  # query 0 also has document 7 as positive
            log(exp(1.6) + exp(0.0) + exp(1.2)) - 1.2,
        ]
    )
    assert loss(ids=ids) == pytest.approx(query_to_candidate, abs=1e-12)
    assert loss(ids=ids, bidirectional=True) == pytest.approx(query_to_candidate + candidate_to_query, abs=1e-12)


def test_every_listed_positive_of_a_query_is_masked():
    ids = CandidateIds(
        positive=torch.tensor([7, 7, 9]),
        query_positives=torch.tensor([[7, -1], [7, -1], [9, 7]]),
    )
    query_to_candidate = mean(
        [
            log(exp(1.2) + exp(1.6)) - 1.2,
            log(exp(2.0) + exp(0.0)) - 2.0,
            0.0,  # query 2 has positives 9 and 7: only its target column is left
        ]
    )
    candidate_to_query = mean([0.0, 0.0, log(exp(1.6) + exp(0.0) + exp(1.2)) - 1.2])
    assert loss(ids=ids, bidirectional=True) == pytest.approx(query_to_candidate + candidate_to_query, abs=1e-12)


def test_own_extra_negatives_add_one_column_per_query():
    expected = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6) + exp(0.0)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0) + exp(0.0)) - 2.0,
            log(exp(0.0) + exp(0.0) + exp(1.2) + exp(0.0)) - 1.2,
        ]
    )
    assert loss(negatives=NEGATIVES, negatives_scope="own") == pytest.approx(expected, abs=1e-12)
    flat = info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES.flatten(0, 1), negatives_scope="own")
    assert flat.loss.item() == pytest.approx(expected, abs=1e-12)


def test_global_extra_negatives_are_shared_by_every_query():
    expected = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6) + exp(0.0) + exp(2.0) + exp(0.0)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0) + exp(0.0) + exp(0.0) + exp(2.0)) - 2.0,
            log(exp(0.0) + exp(0.0) + exp(1.2) + exp(2.0) + exp(0.0) + exp(0.0)) - 1.2,
        ]
    )
    assert loss(negatives=NEGATIVES, negatives_scope="global") == pytest.approx(expected, abs=1e-12)


def test_extra_negative_that_is_another_querys_positive_is_masked_only_for_that_query():
    # query 1's negative is document 9, query 2's positive
    ids = CandidateIds(positive=torch.tensor([7, 8, 9]), negatives=torch.tensor([[20], [9], [21]]))
    shared = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6) + exp(0.0) + exp(2.0) + exp(0.0)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0) + exp(0.0) + exp(0.0) + exp(2.0)) - 2.0,
            log(exp(0.0) + exp(0.0) + exp(1.2) + exp(2.0) + exp(0.0)) - 1.2,  # column of negative 1 removed
        ]
    )
    own = mean(
        [
            log(exp(1.2) + exp(0.0) + exp(1.6) + exp(0.0)) - 1.2,
            log(exp(1.6) + exp(2.0) + exp(0.0) + exp(0.0)) - 2.0,  # 9 is not query 1's positive
            log(exp(0.0) + exp(0.0) + exp(1.2) + exp(0.0)) - 1.2,
        ]
    )
    assert loss(negatives=NEGATIVES, negatives_scope="global", ids=ids) == pytest.approx(shared, abs=1e-12)
    assert loss(negatives=NEGATIVES, negatives_scope="own", ids=ids) == pytest.approx(own, abs=1e-12)


def test_stats_report_in_batch_top1_accuracy_and_similarities():
    stats = info_nce(QUERIES, POSITIVES, TAU).stats
    assert stats["accuracy"].item() == pytest.approx(2 / 3)  # query 0 prefers column 2
    assert stats["positive_similarity"].item() == pytest.approx((0.6 + 1.0 + 0.6) / 3)
    assert stats["hardest_negative_similarity"].item() == pytest.approx((0.8 + 0.8 + 0.0) / 3)
    assert stats["temperature"].item() == pytest.approx(TAU)


def test_temperature_receives_its_gradient():
    def bidirectional_with_negatives(temperature):
        ids = CandidateIds(positive=torch.tensor([7, 7, 9]), negatives=torch.tensor([[20], [9], [21]]))
        return info_nce(
            QUERIES, POSITIVES, temperature, negatives=NEGATIVES, negatives_scope="global", bidirectional=True, ids=ids
        ).loss

    temperature = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    bidirectional_with_negatives(temperature).backward()
    assert temperature.grad is not None and temperature.grad.abs().item() > 0.1
    fresh = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bidirectional_with_negatives, (fresh,))


def test_wrong_inputs_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="negatives_scope"):
        info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES, negatives_scope="batch")
    with pytest.raises(ValueError, match="positive has shape"):
        info_nce(QUERIES, POSITIVES[:2], TAU)
    with pytest.raises(ValueError, match="negatives has shape"):
        info_nce(QUERIES, POSITIVES, TAU, negatives=torch.zeros(2, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="ids.negatives"):
        info_nce(QUERIES, POSITIVES, TAU, negatives=NEGATIVES, ids=CandidateIds(positive=torch.tensor([1, 2, 3])))


def softmax(values, temperature):
    exps = [exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def kl(teacher, student):
    return sum(t * log(t / s) for t, s in zip(teacher, student))


def test_distillation_kl_per_query_candidate_lists():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    candidates = torch.tensor(
        [[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]], dtype=torch.float64
    )
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    # student similarities: query 0 -> [1.0, 0.6, 0.0], query 1 -> [1.0, 0.0, 0.8]
    expected = mean(
        [
            kl(softmax([2.0, 1.0, 0.0], 2.0), softmax([1.0, 0.6, 0.0], TAU)),
            kl(softmax([0.5, 0.5, 3.0], 2.0), softmax([1.0, 0.0, 0.8], TAU)),
        ]
    )
    output = distillation_kl(query, candidates, teacher, TAU, teacher_temperature=2.0)
    assert output.loss.item() == pytest.approx(expected, abs=1e-12)
    assert output.stats["top1_agreement"].item() == pytest.approx(0.5)  # query 1: teacher 2, student 0
    flat = distillation_kl(query, candidates.flatten(0, 1), teacher, TAU, teacher_temperature=2.0)
    assert flat.loss.item() == pytest.approx(expected, abs=1e-12)


def test_distillation_temperature_receives_its_gradient():
    query = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(3, 5, 4, dtype=torch.float64), dim=-1)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    temperature = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    distillation_kl(query, candidates, teacher, temperature, teacher_temperature=1.0).loss.backward()
    assert temperature.grad is not None and temperature.grad.abs().item() > 0
    with pytest.raises(ValueError, match="teacher_scores has shape"):
        distillation_kl(query, candidates, teacher[:, :4], temperature, teacher_temperature=1.0)


def test_without_in_batch_negatives_a_query_sees_only_its_positive_and_own_negatives():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    negatives = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    tau = 0.5
    out = info_nce(query, positive, tau, negatives=negatives, negatives_scope="own", in_batch_negatives=False)
    expected = []
    for i in range(2):
        logits = torch.stack([query[i] @ positive[i], query[i] @ negatives[i, 0]]) / tau
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(out.loss, torch.stack(expected).mean(), atol=1e-6)
    with_in_batch = info_nce(query, positive, tau, negatives=negatives, negatives_scope="own")
    assert not torch.allclose(out.loss, with_in_batch.loss)
    with pytest.raises(ValueError, match="in_batch_negatives=False needs extra negatives"):
        info_nce(query, positive, tau, in_batch_negatives=False)


@pytest.mark.parametrize("scope", ["own", "global"])
def test_top_k_only_softmax_is_one_positive_plus_own_k_negatives_in_either_scope(scope):
    """Table 5's "top-k only": 1 + K columns per query, whatever negatives_scope the stage keeps."""
    generator = torch.Generator().manual_seed(3)
    batch, k, dim, tau = 3, 2, 4, 0.1
    query = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    positive = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(batch, k, dim, generator=generator, dtype=torch.float64), dim=-1)
    out = info_nce(query, positive, tau, negatives=negatives, negatives_scope=scope, in_batch_negatives=False)
    expected = []
    for i in range(batch):
        logits = torch.cat([(query[i] @ positive[i])[None], negatives[i] @ query[i]]) / tau
        assert logits.shape == (1 + k,)
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(out.loss, torch.stack(expected).mean(), atol=1e-12)
    wider = info_nce(query, positive, tau, negatives=negatives, negatives_scope=scope)
    assert not torch.allclose(out.loss, wider.loss)


def test_top_k_only_still_drops_an_own_negative_that_is_a_positive_of_the_query():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positive = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    negatives = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.6, 0.8]]])
    ids = CandidateIds(positive=torch.tensor([10, 11]), negatives=torch.tensor([[20, 10], [21, 22]]))
    tau = 0.5
    out = info_nce(query, positive, tau, negatives=negatives, ids=ids, in_batch_negatives=False)
    kept = [[negatives[0, 0]], [negatives[1, 0], negatives[1, 1]]]  # query 0's second negative is its positive
    expected = []
    for i in range(2):
        logits = torch.stack([query[i] @ positive[i], *[query[i] @ n for n in kept[i]]]) / tau
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(out.loss, torch.stack(expected).mean(), atol=1e-6)
