"""The fine-tuning recipe's parts, shared by ``convae run``, ``finetune`` and every sweep cell.

What the fast supervised baselines do and the lecture's recipe lacks, each one knob:

- training length that scales with the label budget: every epoch sees at least
  ``epoch_images`` images, the labelled set repeated (reshuffled each time) to make them up;
- a learning rate that changes every step (``--schedule triangle``: linear warm-up over the first
  ``warmup`` of the phase's steps, then linear decay to zero; see :func:`convae.training.loop.schedule`);
- label smoothing of the cross-entropy;
- an exponential moving average of the weights and the batch-norm statistics (``ema``), which
  is what is evaluated and saved;
- LP-FT (Kumar et al. 2022): the head first fitted to convergence on the frozen features (the
  logistic probe's fit), then the whole network trained from there;
- test-time flip (``tta``, a model knob: the classifier averages its logits over the image and
  its mirror image in eval mode, so evaluation, prediction and export agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def repeats(labelled: int, epoch_images: int) -> int:
    """How many reshuffled passes over ``labelled`` images make one epoch of at least ``epoch_images``."""
    return max(1, math.ceil(epoch_images / max(labelled, 1)))


class WeightAverage:
    """An exponential moving average of a model's parameters and floating buffers (batch-norm
    statistics), updated after every step. Its decay warms up as ``(1 + t) / (10 + t)`` (capped
    at ``decay``), so a short run's average is not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        state = model.state_dict()
        # a module shared under two names (joint training's encoder) is averaged once: its names share a shadow
        first: dict[tuple, str] = {}
        for k, v in state.items():
            first.setdefault((v.data_ptr(), v.shape, v.dtype), k)
        self.shadow: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            owner = first[(v.data_ptr(), v.shape, v.dtype)]
            self.shadow[k] = self.shadow[owner] if owner != k else v.detach().clone()
        self._floats = [k for k in first.values() if state[k].is_floating_point()]
        self._others = [k for k in first.values() if not state[k].is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()  # views of the model's own tensors: no copy
        # one fused call for every tensor, not one per tensor: a GPU step is short
        torch._foreach_lerp_([self.shadow[k] for k in self._floats], [state[k] for k in self._floats], 1 - d)
        for k in self._others:
            self.shadow[k].copy_(state[k])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block, its own weights again after it."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


def step_hook(model: nn.Module, scheduler, average: WeightAverage | None) -> Callable[[], None] | None:
    """What runs after every optimizer step: the schedule, the weight average (None: nothing)."""
    if scheduler is None and average is None:
        return None

    def hook() -> None:
        if scheduler is not None:
            scheduler.step()
        if average is not None:
            average.update(model)

    return hook
