"""The learning-rate schedule of both backends' optimisers (SFT and DITTO): a transformers schedule by name, with
ceil(warmup_ratio x steps) warm-up steps, shifted so that no step of the run trains at learning rate 0.

transformers' schedules give step 0 of a warm-up the rate 0, and a decaying schedule (cosine, linear) reaches 0 one
step after its last: here step k of `steps` (1-based) takes the rate of step k of a schedule over steps + 1. A warm-up
of w steps then ramps 1/w, 2/w, ..., 1 of the rate, so one warm-up step (short runs) is no warm-up at all, and the
last step of a decay stays above 0. `--ditto.sft_steps 1` trains its one step at the full --ditto.sft_lr.
"""

import math
import warnings

import torch
from transformers import get_scheduler


def lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_ratio: float, steps: int, min_lr_ratio: float | None = None
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `name` over `steps` optimiser steps; `min_lr_ratio` is the floor of the *_with_min_lr schedules
    (OpenRLHF's --actor.min_lr_ratio)."""
    kwargs = {"min_lr_rate": min_lr_ratio} if min_lr_ratio is not None and "min_lr" in name else {}
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * steps),
        num_training_steps=steps + 1,
        scheduler_specific_kwargs=kwargs,
    )
    with warnings.catch_warnings():  # torch warns of a scheduler step before the first optimiser step: it is meant
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    return scheduler
