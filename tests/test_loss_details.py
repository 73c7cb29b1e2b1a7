"""What the mutation run on losses.py found unpinned (see README, Contributing): the logged
statistics with false negatives masked, the distillation statistics, bf16 inputs scored in
float32, id 0 being a real id, and a wrongly shaped query_positives."""
from math import exp, log

import pytest
import torch

from umarvel.training.losses import CandidateIds, distillation_kl, info_nce

TAU = 0.5
# similarity = QUERIES @ POSITIVES.T = [[0.6, 0.0, 0.8], [0.8, 1.0, 0.0], [0.0, 0.0, 0.6]]
QUERIES = torch.eye(3, dtype=torch.float64)
POSITIVES = torch.tensor([[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 0.6]], dtype=torch.float64)


def test_logged_accuracy_and_hardest_negative_leave_false_negatives_out():
    # query 0's best column (2, similarity 0.8) is document 9 = its own positive's id: masked,
    # so query 0 is right at top 1 and its hardest negative is column 1 (0.0)
    stats = info_nce(QUERIES, POSITIVES, TAU, ids=CandidateIds(positive=torch.tensor([9, 8, 9]))).stats
    assert stats["accuracy"].item() == pytest.approx(1.0)
    # query 1: columns 0 (0.8) and 2 (0.0); query 2: column 0 is document 9 too -> column 1 (0.0)
    assert stats["hardest_negative_similarity"].item() == pytest.approx((0.0 + 0.8 + 0.0) / 3)


def test_id_zero_is_a_known_id():
    ids = CandidateIds(positive=torch.tensor([0, 0, 9]))
    expected = (
        log(exp(1.2) + exp(1.6)) - 1.2  # column 1 is document 0 too
        + log(exp(2.0) + exp(0.0)) - 2.0  # column 0 is document 0 too
        + log(exp(0.0) + exp(0.0) + exp(1.2)) - 1.2
    ) / 3
    assert info_nce(QUERIES, POSITIVES, TAU, ids=ids).loss.item() == pytest.approx(expected, abs=1e-12)


def test_query_positives_of_another_batch_size_are_rejected():
    ids = CandidateIds(positive=torch.tensor([1, 2, 3]), query_positives=torch.tensor([[1, 2], [2, 3]]))
    with pytest.raises(ValueError, match="ids.query_positives has shape"):
        info_nce(QUERIES, POSITIVES, TAU, ids=ids)


def test_bfloat16_embeddings_are_scored_in_float32():
    generator = torch.Generator().manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1).bfloat16()
    positive = torch.nn.functional.normalize(torch.randn(6, 16, generator=generator), dim=-1).bfloat16()
    output = info_nce(query, positive, 0.02)
    assert output.loss.dtype == torch.float32
    reference = info_nce(query.float(), positive.float(), 0.02).loss
    assert output.loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_distillation_statistics():
    query = torch.eye(2, dtype=torch.float64)[[0, 1, 0]]
    candidates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]],
                              dtype=torch.float64)
    teacher = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], dtype=torch.float64)
    # student similarities [1, 0], [0, 1], [0, 1]: top 1 agrees for queries 0 and 1, not 2
    output = distillation_kl(query, candidates, teacher, TAU, teacher_temperature=1.0)
    teacher_probs = torch.softmax(teacher, dim=1)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64) / TAU
    per_query = (teacher_probs * (teacher_probs.log() - torch.log_softmax(student, dim=1))).sum(dim=1)
    assert output.stats["kl"].item() == pytest.approx(per_query.mean().item(), abs=1e-12)
    assert output.loss.item() == pytest.approx(per_query.mean().item(), abs=1e-12)
    assert output.stats["top1_agreement"].item() == pytest.approx(2 / 3)
    assert output.stats["temperature"].item() == pytest.approx(TAU)
