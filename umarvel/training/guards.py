"""Stop a run whose numbers are no longer numbers.

A NaN or infinite loss (a learning rate far too high, an fp16 overflow, a bad batch) turns every
weight it updates into NaN; the Trainer would log it as a filtered loss and go on to save NaN
checkpoints, a NaN model, and DONE. Here the loss of every step and the trainable weights
before every save are checked, on every rank together (one flag all-reduce, so all ranks stop
and none waits in a collective), and the run stops with an error before anything is marked
finished.
"""
from __future__ import annotations

import torch
from transformers import TrainerCallback

from umarvel import process
from umarvel.errors import UmarvelError

HINT = ("lower train.learning_rate (now {lr:g}), keep train.max_grad_norm > 0, or train in bf16 or fp32 "
        "(train.precision); nothing of this run was marked finished")


def check_loss(loss: torch.Tensor, step: int, learning_rate: float) -> None:
    """Raise on every rank when the loss of update `step` is not finite on any."""
    if process.any_rank(not bool(torch.isfinite(loss).all()), loss.device):
        value = loss.float().reshape(-1)[0].item()
        raise UmarvelError(f"training stopped at step {step}: the loss is {value} (not finite on this or another "
                           f"rank); " + HINT.format(lr=learning_rate))


class FiniteWeights(TrainerCallback):
    """Before a checkpoint is saved, and when training ends, every trainable weight must be
    finite (each rank checks its own part; under ZeRO-3 that is its partition)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (control.should_save or control.should_training_stop) or model is None:
            return
        trainable = {name: getattr(p, "ds_tensor", p) for name, p in model.named_parameters() if p.requires_grad}
        bad = next((name for name, p in trainable.items() if not bool(torch.isfinite(p).all())), None)
        device = next(iter(trainable.values())).device if trainable else torch.device("cpu")
        if process.any_rank(bad is not None, device):
            where = f" (e.g. {bad})" if bad else " on another rank"
            raise UmarvelError(f"training stopped at step {state.global_step}: trainable weights are not finite{where}; "
                               + HINT.format(lr=args.learning_rate))
