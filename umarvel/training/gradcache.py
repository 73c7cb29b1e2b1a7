"""GradCache inside the loss computation: contrastive batches larger than activations allow.

The pattern of GradCache (Gao et al., 2021) and sentence-transformers' cached losses:
  (a) embed every chunk without a graph, recording the RNG state before each chunk;
  (b) compute the (gathered) loss on the cached embeddings as leaves and take
      d loss / d embedding and d loss / d temperature;
  (c) during backward, re-embed each chunk with a graph under its recorded RNG state (so
      dropout matches (a)) and push the cached gradient through it.
Peak activation memory is one chunk's, whatever the contrastive batch size.

How (c) runs inside the caller's backward: the returned loss is the output of an
autograd.Function whose inputs are the temperature and the trainable parameters. Its
backward re-embeds each chunk and takes `torch.autograd.grad(chunk_embedding, parameters,
cached_gradient * grad_output)`, which neither touches `.grad` nor fires the parameters'
post-accumulate hooks, sums those gradients in float32 and returns them as its inputs'
gradients. Whoever drives backward (a Trainer's `loss.backward()`, DeepSpeed's
`engine.backward(loss)` with 1/GAS or fp16 loss scaling) therefore accumulates each
parameter's gradient exactly once, as after a plain forward. That is what DeepSpeed ZeRO-2
needs (measured with deepspeed 0.19.8): a backward per chunk (the sentence-transformers way)
fires its reduce hooks once per chunk and fails with "Gradient computed twice for this
partition", and `engine.backward` refuses a loss without a grad_fn (a detached leaf with a
hook). Costs: one float32 gradient-sized buffer of the trainable parameters; one extra
forward per chunk.

Requirements on `encode`:
  * Under ZeRO-2 it may call the DeepSpeed engine or the bare module (weights are whole on
    every rank). Under plain DDP it must call the DDP wrapper: a wrapper forward arms DDP's
    gradient reduction; with the bare module the gradients are never all-reduced (silently
    wrong).
  * No reentrant activation checkpointing (`use_reentrant=True` refuses `autograd.grad`);
    non-reentrant checkpointing works.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from umarvel.training.losses import LossOutput

Batch = Mapping[str, torch.Tensor]
Encode = Callable[[Batch], torch.Tensor]
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], LossOutput]
Split = Callable[[Batch, int], list[Batch]]


def split_rows(batch: Batch, chunk_size: int) -> list[Batch]:
    """Split every tensor of `batch` along dim 0 into chunks of `chunk_size` items.

    Right for batches whose tensors all have one row per item (text, features). Qwen2-VL
    image batches are not: `pixel_values` holds patches; pass a layout-aware `split`.
    """
    rows = {key: int(value.shape[0]) for key, value in batch.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"cannot split a batch by rows when tensors disagree on dim 0: {rows}; pass `split=`")
    total = next(iter(rows.values()))
    starts = range(0, total, chunk_size)
    return [{key: value[start : start + chunk_size] for key, value in batch.items()} for start in starts]


def embed_and_compute_loss(
    encode: Encode,
    batches: Mapping[str, Batch],
    loss_fn: LossFn,
    temperature: torch.Tensor | float,
    *,
    chunk_size: int | None = None,
    parameters: Iterable[torch.Tensor] = (),
    split: Split = split_rows,
) -> LossOutput:
    """Embed each named batch with `encode` and return `loss_fn(embeddings, temperature)`.

    `embeddings` maps the names of `batches` (e.g. "query", "positive", "negative") to
    [rows, D] tensors. chunk_size None or 0: plain autograd. chunk_size > 0: GradCache over
    chunks made by `split`; `parameters` must then list the trainable parameters `encode`
    uses (frozen ones are skipped), since their gradients are computed in backward.
    """
    temperature = torch.as_tensor(temperature)
    if not chunk_size:
        return loss_fn({name: encode(batch) for name, batch in batches.items()}, temperature)

    chunks = {name: [_Chunk(batch=part) for part in split(batch, chunk_size)] for name, batch in batches.items()}
    with torch.no_grad():
        for group in chunks.values():
            for chunk in group:
                chunk.rng = _RngState.capture()
                chunk.embedding = encode(chunk.batch)
    cached = {name: torch.cat([chunk.embedding for chunk in group]) for name, group in chunks.items()}

    trainable = [p for p in parameters if p.requires_grad]
    if not torch.is_grad_enabled() or not (trainable or temperature.requires_grad):
        return loss_fn(cached, temperature)

    with torch.enable_grad():
        leaves = {name: embedding.requires_grad_() for name, embedding in cached.items()}
        temperature_leaf = temperature.detach().requires_grad_(temperature.requires_grad)
        output = loss_fn(leaves, temperature_leaf)
        wrt = [*leaves.values(), *([temperature_leaf] if temperature.requires_grad else [])]
        gradients = torch.autograd.grad(output.loss, wrt, allow_unused=True)

    for group, gradient in zip(chunks.values(), gradients):
        for chunk, part in zip(group, _split_like(gradient, group)):
            chunk.gradient = part
    replay = _Replay(
        encode=encode,
        chunks=[chunk for group in chunks.values() for chunk in group if chunk.gradient is not None],
        parameters=trainable,
        temperature_gradient=gradients[-1] if temperature.requires_grad else None,
    )
    loss = _CachedLoss.apply(replay, output.loss.detach(), temperature, *trainable)
    return LossOutput(loss=loss, stats=output.stats)


class _RngState:
    """CPU (and, once initialised, every CUDA device's) RNG state, to replay dropout."""

    def __init__(self, cpu: torch.Tensor, cuda: list[torch.Tensor]):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls) -> _RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def restored(self):
        """Run the block from this state; the global RNG is left as it was before."""
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


@dataclass
class _Chunk:
    batch: Batch
    rng: _RngState | None = None
    embedding: torch.Tensor | None = None
    gradient: torch.Tensor | None = None


def _split_like(gradient: torch.Tensor | None, group: list[_Chunk]) -> list[torch.Tensor | None]:
    """The group's cached gradient cut back into its chunks (None if the loss ignored it)."""
    if gradient is None:
        return [None] * len(group)
    return list(gradient.split([chunk.embedding.shape[0] for chunk in group]))


@dataclass
class _Replay:
    """What backward needs to re-embed the chunks and produce parameter gradients."""

    encode: Encode
    chunks: list[_Chunk]
    parameters: list[torch.Tensor]
    temperature_gradient: torch.Tensor | None

    def parameter_gradients(self, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
        totals: list[torch.Tensor | None] = [None] * len(self.parameters)
        if not self.parameters:
            return totals
        with torch.enable_grad():
            for chunk in self.chunks:
                with chunk.rng.restored():
                    embedding = self.encode(chunk.batch)
                if not embedding.requires_grad:
                    continue
                upstream = (chunk.gradient * grad_output).to(embedding.dtype)
                grads = torch.autograd.grad(embedding, self.parameters, upstream, allow_unused=True)
                for index, grad in enumerate(grads):
                    if grad is None:
                        continue
                    totals[index] = grad.float() if totals[index] is None else totals[index].add_(grad)
        return [None if total is None else total.to(p.dtype) for total, p in zip(totals, self.parameters)]


class _CachedLoss(torch.autograd.Function):
    """Forward: the loss value from step (b). Backward: step (c), gradients for the inputs."""

    @staticmethod
    def forward(ctx, replay: _Replay, loss_value: torch.Tensor, temperature: torch.Tensor, *parameters):
        ctx.replay = replay
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        replay: _Replay = ctx.replay
        temperature_grad = None
        if replay.temperature_gradient is not None:
            temperature_grad = replay.temperature_gradient * grad_output
        return (None, None, temperature_grad, *replay.parameter_gradients(grad_output))


__all__ = ["Batch", "Encode", "LossFn", "Split", "embed_and_compute_loss", "split_rows"]
