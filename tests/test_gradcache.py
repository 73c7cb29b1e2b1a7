"""GradCache gradients against plain autograd: single process with dropout, and a 2-rank
DeepSpeed ZeRO-2 and ZeRO-3 step."""
import contextlib
import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from contrastive_standin import (
    SCENARIOS,
    TEMPERATURE,
    StandInEmbedder,
    contrastive_loss,
    global_batch,
    gradients,
    max_difference,
    reference_gradients,
)
from umarvel.errors import UmarvelError
from umarvel.training import gradcache
from umarvel.training.gradcache import split_rows, token_chunks
from umarvel.training.losses import info_nce

TESTS = Path(__file__).parent
TOLERANCE = 1e-5
CACHED = SCENARIOS["gradcache_global_negatives_bidirectional"]
PLAIN = replace(CACHED, chunk_size=None)


def chunkwise_encode(model, chunk_size):
    """Plain autograd that embeds chunk by chunk in GradCache's order, so dropout draws the
    same random numbers as GradCache's first (no-graph) pass."""

    def encode(batch):
        features = batch["features"]
        return torch.cat([model(features[start : start + chunk_size]) for start in range(0, len(features), chunk_size)])

    return encode


def dropout_gradients(cached: bool) -> dict[str, torch.Tensor]:
    model = StandInEmbedder(dropout=0.3).train()
    torch.manual_seed(7)
    if cached:
        output = contrastive_loss(model, global_batch(), CACHED)
    else:
        output = contrastive_loss(model, global_batch(), PLAIN, encode=chunkwise_encode(model, CACHED.chunk_size))
    output.loss.backward()
    return gradients(model)


def test_gradcache_matches_plain_gradients_with_dropout_active():
    cached = dropout_gradients(cached=True)
    difference = max_difference(cached, dropout_gradients(cached=False))
    assert difference < TOLERANCE, f"max gradient difference {difference:.2e}"
    assert cached[TEMPERATURE].abs().item() > 1e-3


def test_without_rng_replay_the_dropout_comparison_fails(monkeypatch):
    monkeypatch.setattr(gradcache._RngState, "restored", lambda self: contextlib.nullcontext())
    difference = max_difference(dropout_gradients(cached=True), dropout_gradients(cached=False))
    assert difference > 100 * TOLERANCE


def test_gradcache_matches_the_plain_path_loss_stats_and_gradients():
    plain_model, cached_model = StandInEmbedder(), StandInEmbedder()
    plain = contrastive_loss(plain_model, global_batch(), PLAIN)
    cached = contrastive_loss(cached_model, global_batch(), CACHED)
    plain.loss.backward()
    cached.loss.backward()
    assert cached.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert cached.stats.keys() == plain.stats.keys()
    for name in plain.stats:
        assert cached.stats[name].item() == pytest.approx(plain.stats[name].item(), rel=1e-6, abs=1e-7)
    assert max_difference(gradients(cached_model), gradients(plain_model)) < TOLERANCE


def test_upstream_gradient_scales_the_cached_gradients():
    """DeepSpeed multiplies the loss by 1/accumulation steps (or a loss scale) before backward."""
    model = StandInEmbedder()
    (3.0 * contrastive_loss(model, global_batch(), CACHED).loss).backward()
    tripled = {name: grad / 3.0 for name, grad in gradients(model).items()}
    assert max_difference(tripled, reference_gradients(CACHED)) < TOLERANCE


def test_frozen_encoder_still_trains_the_temperature():
    model = StandInEmbedder()
    model.encoder.requires_grad_(False)
    contrastive_loss(model, global_batch(), CACHED).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    expected = reference_gradients(CACHED)[TEMPERATURE]
    assert model.temperature.log_temperature.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_grad_the_cached_path_only_computes_the_loss():
    model = StandInEmbedder()
    with torch.no_grad():
        cached = contrastive_loss(model, global_batch(), CACHED)
        plain = contrastive_loss(model, global_batch(), PLAIN)
    assert not cached.loss.requires_grad
    assert cached.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)


def test_the_last_chunk_is_embedded_once_and_backward_starts_with_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    calls = []

    def encode(batch):
        calls.append((int(batch["features"][0, 0]), torch.is_grad_enabled()))
        return model(batch["features"])

    features = {name: torch.arange(24.0).view(6, 4) + offset for name, offset in (("query", 0), ("positive", 100))}
    output = gradcache.embed_and_compute_loss(
        encode, {name: {"features": value} for name, value in features.items()},
        lambda e, t: info_nce(e["query"], e["positive"], t), 0.05, chunk_size=2, parameters=model.parameters())
    embedded = [(0, False), (8, False), (16, False), (100, False), (108, False), (116, True)]
    assert calls == embedded
    output.loss.backward()
    assert calls[len(embedded):] == [(0, True), (8, True), (16, True), (100, True), (108, True)]
    cached = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    info_nce(model(features["query"]), model(features["positive"]), torch.tensor(0.05)).loss.backward()
    assert all(torch.allclose(cached[name], p.grad, atol=1e-6) for name, p in model.named_parameters())


def mark_as_zero3(model: torch.nn.Module) -> None:
    """Give the parameters the attribute DeepSpeed ZeRO-3 puts on its own: GradCache then takes
    its ZeRO-3 path (a backward per chunk), which plain autograd can check in one process."""
    for index, parameter in enumerate(model.parameters()):
        parameter.ds_id = index


def test_zero3_path_matches_plain_gradients_with_dropout_active():
    model = StandInEmbedder(dropout=0.3).train()
    mark_as_zero3(model)
    torch.manual_seed(7)
    contrastive_loss(model, global_batch(), CACHED).loss.backward()
    difference = max_difference(gradients(model), dropout_gradients(cached=False))
    assert difference < TOLERANCE, f"max gradient difference {difference:.2e}"
    assert not any(hasattr(p, "ds_grad_is_ready") for p in model.parameters())


def test_zero3_path_refuses_a_parameter_the_last_chunk_does_not_use():
    """DeepSpeed reduces a gradient when the last chunk accumulates it: one it skips is lost."""
    model = StandInEmbedder()
    model.gate = torch.nn.Parameter(torch.ones(()))
    mark_as_zero3(model)

    def encode(batch):  # the last chunk of the last batch (negatives) holds one row
        features = batch["features"]
        return model(features * model.gate if len(features) > 1 else features)

    output = contrastive_loss(model, global_batch(), CACHED, encode=encode)
    with pytest.raises(UmarvelError, match="not from the last one"):
        output.loss.backward()


def test_split_rows_refuses_a_batch_whose_tensors_disagree_on_rows():
    chunks = split_rows({"input_ids": torch.zeros(5, 7), "attention_mask": torch.ones(5, 7)}, 2)
    assert [len(chunk["input_ids"]) for chunk in chunks] == [2, 2, 1]
    with pytest.raises(ValueError, match="pixel_values"):
        split_rows({"input_ids": torch.zeros(2, 7), "pixel_values": torch.zeros(9, 3)}, 1)


def mask(lengths: list[int]) -> torch.Tensor:
    return (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()


def test_token_chunks_keep_each_chunk_within_the_budget_and_the_order():
    lengths = [3, 5, 2, 40, 4, 4, 4, 4, 9, 1]
    counts = token_chunks(mask(lengths), max_tokens=16)
    assert counts == [3, 1, 4, 1, 1]  # 40 > 16 goes alone; [9] then [1] would cost 2 x 9 = 18
    start = 0
    for count in counts:
        part = lengths[start : start + count]
        assert count == 1 or count * max(part) <= 16, part
        start += count
    assert start == len(lengths)
    assert token_chunks(mask(lengths), max_tokens=16, max_items=2) == [2, 1, 1, 2, 2, 1, 1]
    assert token_chunks(mask([7] * 6), max_tokens=1000) == [6]


def test_token_chunks_give_the_plain_loss_and_gradients():
    """Stand-in items with lengths: chunks of 1 to 3 items, the plain step's loss and gradients."""
    lengths = torch.tensor([1, 6, 2, 2, 5, 3, 1, 4])
    batch = global_batch()

    def with_mask(features):
        rows = features.shape[0]
        return {"features": features, "attention_mask": mask(lengths.repeat(rows // len(lengths)).tolist())}

    batches = {"query": with_mask(batch["query"]), "positive": with_mask(batch["positive"]),
               "negative": with_mask(batch["negative"].flatten(0, 1))}

    def step(**chunking):
        model = StandInEmbedder()
        output = gradcache.embed_and_compute_loss(
            lambda b: model(b["features"]),
            batches,
            lambda e, t: info_nce(e["query"], e["positive"], t, negatives=e["negative"], negatives_scope="global",
                                  bidirectional=True),
            model.temperature(),
            parameters=list(model.parameters()),
            **chunking,
        )
        output.loss.backward()
        return output.loss.item(), gradients(model)

    seen = []
    real_split = split_rows
    monkey = lambda b, sizes: seen.append(list(sizes)) or real_split(b, sizes)  # noqa: E731
    plain_loss, plain = step()
    tokens_loss, by_tokens = step(chunk_tokens=8, split=monkey)
    assert seen[0] == [1, 1, 2, 1, 2, 1]  # 1 | 6 | 2 2 | 5 | 3 1 | 4 within 8 tokens
    assert tokens_loss == pytest.approx(plain_loss, rel=1e-6)
    assert max_difference(by_tokens, plain) < TOLERANCE  # fp32 sums in another order: 1e-7..2e-6 seen


def test_token_chunks_need_an_attention_mask():
    model = StandInEmbedder()
    with pytest.raises(ValueError, match="attention_mask"):
        gradcache.embed_and_compute_loss(lambda b: model(b["features"]), {"query": {"features": torch.zeros(2, 12)}},
                                         lambda e, t: None, model.temperature(), chunk_tokens=4,
                                         parameters=list(model.parameters()))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ZeRO-3 refuses uneven per-rank chunk counts (every forward gathers collectively).
REFUSED = {(3, "gradcache_uneven_bare_module")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_step_matches_single_process(tmp_path, stage):
    """Two CPU ranks under `deepspeed --num_gpus 2`; the first run JIT-compiles an op (~1 min)."""
    out = tmp_path / f"zero{stage}.pt"
    command = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
        str(TESTS / "deepspeed_gradcache_worker.py"), "--stage", str(stage), "--out", str(out),
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
    }
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
    results = torch.load(out, weights_only=True)
    learning_rate = results["learning_rate"]
    for name, variant in results["variants"].items():
        if (stage, name) in REFUSED:
            assert "same number of chunks on every rank" in variant.get("error", ""), name
            continue
        assert "error" not in variant, f"{name}: {variant.get('error')}"
        reference = reference_gradients(SCENARIOS[variant["scenario"]])
        difference = max_difference(variant["gradients"], reference)
        assert difference < TOLERANCE, f"{name}: max gradient difference {difference:.2e}"
        stepped = {key: variant["before"][key] - learning_rate * reference[key] for key in reference}
        step_difference = max_difference(variant["after"], stepped)
        assert step_difference < TOLERANCE, f"{name}: max parameter difference after the step {step_difference:.2e}"
