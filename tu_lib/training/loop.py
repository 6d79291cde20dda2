"""The one training loop of tu: the organism build (stage 00), unlearning (stage 02) and the cost stage's timed steps
(stage 04) all update their parameters with `Optimiser.update` and walk their steps with `run_steps`, so the steps
stage 04 times are the steps stage 02 takes.

An update is: backward (the caller's, e.g. accelerate's), an optional gradient reduction across processes, gradient-
norm clipping, AdamW (no weight decay), the LR schedule's step, and zeroing the gradients, in that order (a resumed
unlearning run ends bit-identical to an uninterrupted one, so the order is part of the contract).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.std import tqdm  # plain bars: tqdm.auto warns about ipywidgets on stderr in notebooks

from ..models.generate import progress_enabled


def linear_decay(steps: int) -> Callable[[int], float]:
    """LR factor 1 → 0 over `steps` steps, no warm-up (Yao et al.'s unlearning schedule)."""
    return lambda s: max(0.0, 1.0 - s / steps)


def warmup_then_decay(steps: int, warmup: int, *, last: bool = True) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `steps` (the organism build's schedules; with
    `last` False the decay reaches 0 one step later, as the tower's does)."""
    if last:
        return lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps)
    return lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / steps)


class Optimiser:
    """AdamW without weight decay over the trainable `params` (or torch's parameter groups, when a part learns at its
    own rate), an LR factor per step (None: constant) and clipping of the gradients' global norm to `clip` (None: no
    clipping)."""

    def __init__(self, params: Iterable[torch.nn.Parameter] | Iterable[dict], lr: float,
                 lr_factor: Callable[[int], float] | None = None, clip: float | None = 1.0):
        items = list(params)
        if items and isinstance(items[0], dict):  # torch's parameter groups, e.g. a part with its own "lr"
            groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
            groups = [g for g in groups if g["params"]]
            self.params = [p for g in groups for p in g["params"]]
        else:
            groups = self.params = [p for p in items if p.requires_grad]
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor) if lr_factor is not None else None
        self.clip = clip

    def update(self, loss: torch.Tensor, backward: Callable[[torch.Tensor], None] | None = None,
               reduce: Callable[[list[torch.nn.Parameter]], None] | None = None) -> None:
        (backward or torch.Tensor.backward)(loss)
        if reduce is not None:
            reduce(self.params)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0] if self.sched is not None else self.opt.param_groups[0]["lr"]


def run_steps(step: Callable[[int], bool | None], total: int, *, start: int = 0, desc: str = "train") -> int:
    """Call `step(i)` for i = start .. total-1 under a progress bar; a step that returns True stops the loop (a stop
    rule). Returns the number of steps taken in this call."""
    taken = 0
    with tqdm(total=total, initial=start, desc=desc, disable=not progress_enabled()) as bar:
        for i in range(start, total):
            stop = step(i)
            taken += 1
            bar.update(1)
            if stop:
                break
    return taken
