"""GradCache inside the loss computation: contrastive batches larger than activations allow.

The pattern of GradCache (Gao et al., 2021) and sentence-transformers' cached losses:
  (a) embed every chunk without a graph, recording the RNG state before each chunk;
  (b) compute the (gathered) loss on the cached embeddings as leaves and take
      d loss / d embedding and d loss / d temperature;
  (c) during backward, re-embed each chunk with a graph under its recorded RNG state (so
      dropout matches (a)) and push the cached gradient through it.
Peak activation memory is one chunk's, whatever the contrastive batch size. The last chunk is
embedded with its graph in (a) and goes first in (c), so it is embedded once (outside ZeRO-3):
one forward fewer per step at the same peak.

How (c) runs inside the caller's backward: the returned loss is the output of an
autograd.Function whose inputs are the temperature and the trainable parameters. Its
backward re-embeds each chunk and takes `torch.autograd.grad(chunk_embedding, parameters,
cached_gradient * grad_output)`, which neither touches `.grad` nor fires the parameters'
post-accumulate hooks, sums those gradients in float32 (each as autograd computes it, through a
tensor hook on the parameter) and returns them as its inputs' gradients. Whoever drives
backward (a Trainer's `loss.backward()`, DeepSpeed's `engine.backward(loss)` with 1/GAS or fp16
loss scaling) therefore accumulates each parameter's gradient exactly once, as after a plain
forward. That is what DeepSpeed ZeRO-2 needs (measured with deepspeed 0.19.8): a backward per
chunk (the sentence-transformers way) fires its reduce hooks once per chunk and fails with
"Gradient computed twice for this partition", and `engine.backward` refuses a loss without a
grad_fn (a detached leaf with a hook). Costs: one float32 gradient-sized buffer of the
trainable parameters; one extra forward per chunk but the last.

Under DeepSpeed ZeRO-3 (parameters carry `ds_id`) that cannot work: a partitioned parameter
has shape [0] outside its module's forward, autograd fixes a leaf's gradient shape when a
graph first uses it, and accumulating a full-shaped gradient into it fails ("returned an
invalid gradient ... expected shape compatible with [0]"). There, backward runs
`torch.autograd.backward` through each re-embedded chunk, so ZeRO-3's own module hooks
gather the parameters around every chunk's backward, with `ds_grad_is_ready` False for all
chunks but the last: DeepSpeed's switch for gradients built over a loop of chunks (its
TiledMLP), which lets them accumulate in `.grad` (in the parameters' dtype) and be reduced
once. The loss node's inputs are then the cached embeddings, not the parameters. Measured
with deepspeed 0.19.8 over 2 ranks: the gradients of the plain step. Since every forward
gathers collectively, every rank must embed the same number of chunks (checked; the
Trainer's even batches ensure it).

Requirements on `encode`:
  * Under ZeRO-2 and ZeRO-3 it may call the DeepSpeed engine or the bare module (ZeRO-3's
    hooks sit on the submodules). Under plain DDP it must call the DDP wrapper: a wrapper
    forward arms DDP's gradient reduction; with the bare module the gradients are never
    all-reduced (silently wrong).
  * No reentrant activation checkpointing (`use_reentrant=True` refuses `autograd.grad`);
    non-reentrant checkpointing works.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from umarvel.errors import UmarvelError
from umarvel.training.distributed import is_distributed
from umarvel.training.losses import LossOutput

Batch = Mapping[str, torch.Tensor]
Encode = Callable[[Batch], torch.Tensor]
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], LossOutput]
Split = Callable[[Batch, "int | list[int]"], list[Batch]]


def chunk_row_counts(rows: int, chunk_size: int | list[int]) -> list[int]:
    """Items per chunk: `chunk_size` items each (the last may hold fewer), or the given counts."""
    if isinstance(chunk_size, int):
        return [min(chunk_size, rows - start) for start in range(0, rows, chunk_size)]
    if sum(chunk_size) != rows or min(chunk_size, default=1) < 1:
        raise ValueError(f"chunk sizes {chunk_size} do not partition {rows} rows")
    return list(chunk_size)


def split_rows(batch: Batch, chunk_size: int | list[int]) -> list[Batch]:
    """Split every tensor of `batch` along dim 0 into chunks of `chunk_size` items (or of the
    listed item counts, see `chunk_row_counts`).

    Right for batches whose tensors all have one row per item (text, features). Qwen2-VL
    image batches are not: `pixel_values` holds patches; pass a layout-aware `split`.
    """
    rows = {key: int(value.shape[0]) for key, value in batch.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"cannot split a batch by rows when tensors disagree on dim 0: {rows}; pass `split=`")
    counts = chunk_row_counts(next(iter(rows.values())), chunk_size)
    return [dict(zip(batch, parts)) for parts in zip(*(value.split(counts) for value in batch.values()))]


def token_chunks(attention_mask: torch.Tensor, max_tokens: int, max_items: int | None = None) -> list[int]:
    """Items per chunk so that no chunk runs more than `max_tokens` tokens (and, when given,
    holds more than `max_items` items); an item longer than the budget goes alone.

    A chunk's cost is what its forward computes: its items times its longest item, since a
    chunk is padded to its longest row (text and visual tokens alike: a Qwen2-VL sequence holds
    one <|image_pad|> per merged visual token). Chunks keep the batch's order, so the loss and
    gradients are those of the unchunked batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lengths = attention_mask.sum(dim=1).tolist()
    counts: list[int] = []
    items = longest = 0
    for length in lengths:
        grown = max(longest, int(length))
        if items and ((items + 1) * grown > max_tokens or items == max_items):
            counts.append(items)
            items, longest = 1, int(length)
        else:
            items, longest = items + 1, grown
    return counts + ([items] if items else [])


def embed_and_compute_loss(
    encode: Encode,
    batches: Mapping[str, Batch],
    loss_fn: LossFn,
    temperature: torch.Tensor | float,
    *,
    chunk_size: int | None = None,
    chunk_tokens: int | None = None,
    parameters: Iterable[torch.Tensor] = (),
    split: Split = split_rows,
) -> LossOutput:
    """Embed each named batch with `encode` and return `loss_fn(embeddings, temperature)`.

    `embeddings` maps the names of `batches` (e.g. "query", "positive", "negative") to
    [rows, D] tensors. chunk_size and chunk_tokens None or 0: plain autograd. Otherwise
    GradCache over chunks made by `split`: of chunk_size items, or, with chunk_tokens, of at most
    that many tokens (and at most chunk_size items when both are set; see `token_chunks`, which
    reads each batch's "attention_mask"). `parameters` must then list the trainable parameters
    `encode` uses (frozen ones are skipped), since their gradients are computed in backward.
    """
    temperature = torch.as_tensor(temperature)
    if not chunk_size and not chunk_tokens:
        return loss_fn({name: encode(batch) for name, batch in batches.items()}, temperature)

    def parts(batch: Batch) -> list[Batch]:
        if not chunk_tokens:
            return split(batch, chunk_size)
        if "attention_mask" not in batch:
            raise ValueError(f"GradCache chunks by tokens read a batch's attention_mask; this one holds {sorted(batch)}")
        return split(batch, token_chunks(batch["attention_mask"], chunk_tokens, chunk_size or None))

    chunks = {name: [_Chunk(batch=part) for part in parts(batch)] for name, batch in batches.items()}
    trainable = [p for p in parameters if p.requires_grad]
    partitioned = any(hasattr(p, "ds_id") for p in trainable)
    if partitioned:
        _check_same_chunk_counts([len(group) for group in chunks.values()])
    ordered = [chunk for group in chunks.values() for chunk in group]
    # The last chunk keeps its graph: backward starts with it, so it is never embedded twice and
    # its activations are gone before the first replay (peak: still one chunk's activations).
    keep_last = torch.is_grad_enabled() and bool(trainable) and not partitioned
    for index, chunk in enumerate(ordered):
        chunk.rng = _RngState.capture()
        if keep_last and index == len(ordered) - 1:
            chunk.graph = encode(chunk.batch)
            chunk.embedding = chunk.graph.detach()
        else:
            with torch.no_grad():
                chunk.embedding = encode(chunk.batch)
    cached = {name: torch.cat([chunk.embedding for chunk in group]) for name, group in chunks.items()}

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
            if part is None:
                chunk.graph = None
    replay = _Replay(
        encode=encode,
        chunks=[chunk for group in chunks.values() for chunk in group if chunk.gradient is not None],
        parameters=trainable,
        temperature_gradient=gradients[-1] if temperature.requires_grad else None,
        partitioned=partitioned,
    )
    inputs = list(leaves.values()) if replay.partitioned else trainable
    loss = _CachedLoss.apply(replay, output.loss.detach(), temperature, *inputs)
    return LossOutput(loss=loss, stats=output.stats)


def _check_same_chunk_counts(counts: list[int]) -> None:
    """Under ZeRO-3 every forward and backward gathers parameters collectively, so every rank
    must embed the same number of chunks; uneven ones would hang, so they are refused."""
    if not is_distributed():
        return
    local = torch.tensor(counts, dtype=torch.int64)
    every = funcol.wait_tensor(funcol.all_gather_single(local, 0, dist.group.WORLD)).view(-1, len(counts))
    if not bool((every == local).all()):
        raise UmarvelError(
            f"GradCache under DeepSpeed ZeRO-3 needs the same number of chunks on every rank (each forward gathers "
            f"the partitioned parameters collectively); chunks per batch and rank: {every.tolist()}. "
            "Give every rank the same batch size, and chunk by items (train.loss.gradcache_chunk_size), not by tokens"
        )


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
    graph: torch.Tensor | None = None  # the embedding with its graph (the last chunk), until backward


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
    partitioned: bool  # DeepSpeed ZeRO-3 parameters

    def parameter_gradients(self, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
        totals: list[torch.Tensor | None] = [None] * len(self.parameters)
        if not self.parameters:
            return totals
        # Each chunk's gradient of a parameter is added to its total the moment autograd computes
        # it, by a tensor hook whose result autograd.grad then captures in its place (a zero
        # expanded to the parameter's shape, made before any chunk runs), so that gradient is
        # freed at once. Captured until the chunk's backward ends, these small tensors sit in the
        # memory that backward frees and fragment it: measured on CPU (scripts/bench_peer.py), the
        # process then grew by some 40 MiB more during a step.
        zeros = {}
        captured = [zeros.setdefault((p.dtype, p.device), p.new_zeros(())).expand(p.shape) for p in self.parameters]

        def accumulate(index: int, grad: torch.Tensor) -> torch.Tensor:
            totals[index] = grad.float() if totals[index] is None else totals[index].add_(grad)
            return captured[index]

        hooks = [p.register_hook(lambda grad, index=index: accumulate(index, grad))
                 for index, p in enumerate(self.parameters)]
        try:
            with torch.enable_grad():
                for chunk in sorted(self.chunks, key=lambda chunk: chunk.graph is None):
                    if chunk.graph is not None:
                        embedding, chunk.graph = chunk.graph, None
                    else:
                        with chunk.rng.restored():
                            embedding = self.encode(chunk.batch)
                    if embedding.requires_grad:
                        upstream = (chunk.gradient * grad_output).to(embedding.dtype)
                        torch.autograd.grad(embedding, self.parameters, upstream, allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()
        return [None if total is None else total.to(p.dtype) for total, p in zip(totals, self.parameters)]

    def accumulate_under_zero3(self, grad_output: torch.Tensor) -> None:
        """Backward through each re-embedded chunk; ZeRO-3 reduces each gradient once, after the last.

        `ds_grad_is_ready = False` is DeepSpeed's own switch for gradients built over a loop of
        chunks (its TiledMLP): the reduce hook then leaves the gradient accumulating in `.grad`.
        A parameter the last chunk does not use would never be reduced: that is refused.
        """
        if not self.chunks:
            return
        *earlier, last = self.chunks
        for chunk in earlier:
            self._backward(chunk, grad_output, ready=False)
        pending = {id(p) for p in self.parameters if p.grad is not None}
        reduced: set[int] = set()
        hooks = [p.register_post_accumulate_grad_hook(lambda p: reduced.add(id(p))) for p in self.parameters]
        try:
            self._backward(last, grad_output, ready=True)
        finally:
            for hook in hooks:
                hook.remove()
        if pending - reduced:
            raise UmarvelError(
                f"GradCache under ZeRO-3: {len(pending - reduced)} trainable parameter(s) got gradients from earlier "
                "chunks but not from the last one, so DeepSpeed would never reduce them; every chunk must use the "
                "same trainable parameters"
            )

    def _backward(self, chunk: _Chunk, grad_output: torch.Tensor, ready: bool) -> None:
        for p in self.parameters:
            p.ds_grad_is_ready = ready
        try:
            with torch.enable_grad(), chunk.rng.restored():
                embedding = self.encode(chunk.batch)
            if embedding.requires_grad:
                torch.autograd.backward(embedding, (chunk.gradient * grad_output).to(embedding.dtype))
        finally:
            for p in self.parameters:
                del p.ds_grad_is_ready


class _CachedLoss(torch.autograd.Function):
    """Forward: the loss value from step (b). Backward: step (c), gradients for the inputs."""

    @staticmethod
    def forward(ctx, replay: _Replay, loss_value: torch.Tensor, temperature: torch.Tensor, *inputs):
        ctx.replay, ctx.inputs = replay, len(inputs)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        replay: _Replay = ctx.replay
        temperature_grad = None
        if replay.temperature_gradient is not None:
            temperature_grad = replay.temperature_gradient * grad_output
        if replay.partitioned:
            replay.accumulate_under_zero3(grad_output)
            return (None, None, temperature_grad, *[None] * ctx.inputs)
        return (None, None, temperature_grad, *replay.parameter_gradients(grad_output))


__all__ = ["Batch", "Encode", "LossFn", "Split", "chunk_row_counts", "embed_and_compute_loss", "split_rows", "token_chunks"]
