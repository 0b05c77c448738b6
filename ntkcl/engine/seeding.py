"""Seeds derived from the run seed and the position in the run.

Every random stream of a run is a function of (run seed, where the run is): the method's initial weights of
(seed), a task's new modules of (seed, task), the sampler order of (seed, task, epoch), each training
image's augmentation of (seed, task, epoch, image) and the dropout of each optimizer step of (seed, task,
epoch, step, rank). A run resumed at any of these positions (after a task, an epoch or a step) therefore
draws exactly the numbers the uninterrupted run drew, without carrying generator states between processes.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Distinct first keys keep the streams apart when their remaining keys coincide.
AUGMENTATION_STREAM = 0x617567
STEP_STREAM = 0x737470
STATISTICS_STREAM = 0x737461


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from a tuple of integers (run seed, task, rank...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators (every device) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
