"""Determinism: seeds, and thread counts that come from parameters, never from the machine.

Floating-point sums depend on how work is split between threads, so the same seed trained with one
intra-op thread and with two gives different weights; how many cores the machine has does not matter
once the thread count is fixed (checked with ``taskset``: one core or two, same weights). Every training
recipe therefore carries its thread count (part of the checkpoint key), and every chapter sets its own
from its ``threads`` parameter. Another CPU family may still pick other kernels and so other floats:
the chapters decide their claims over seeds so that a verdict does not hang on the last digit.
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy as np
import torch

# Threads of the book's small models: one thread trains LeNet5, LeNet-300-100 and ResNet-8 as fast as two
# on this 2-core machine, which leaves the other core to a second process. ResNet-20 recipes use two.
DEFAULT_THREADS = 1
MAX_SEED = 2**32 - 1  # the largest seed that NumPy, scikit-learn, XGBoost and torch all accept

_ENV = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}


def fixed_env() -> dict[str, str]:
    """Environment for child processes (kernels, workers): maths libraries without dynamic threading."""
    return dict(_ENV)


for _key, _value in _ENV.items():  # only takes effect in processes that import this before OpenMP starts
    os.environ.setdefault(_key, _value)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same, for shuffling."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is not allowed; expected an int in [0, {MAX_SEED}]")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure(threads: int) -> None:
    """Fix this process's torch threads (intra-op, and inter-op where still possible), ask torch for
    deterministic algorithms, and cap the BLAS / OpenMP pools that NumPy and scikit-learn use."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} is not allowed; expected an int >= 1")
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before the first parallel work of the process
        torch.set_num_interop_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # Pools loaded later (scipy's and scikit-learn's own OpenBLAS and OpenMP, when DoWhy or a regression first
    # imports them) read these at start-up; threadpoolctl caps those already loaded. Without both, a BLAS
    # pool sized by the machine's core count moved DoWhy's estimates in the last digits.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on it
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threadpool_limits(threads)


@contextlib.contextmanager
def threads(n: int):
    """Run the body with ``n`` intra-op torch threads, then restore the previous count."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads={n!r} is not allowed; expected an int >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def channels_last_safe(model: torch.nn.Module) -> bool:
    """Whether training ``model`` in channels_last memory is safe with this torch: oneDNN's backward pass of
    a 1x1 stride-2 convolution in channels_last with fewer than 8 input channels hangs or corrupts the heap
    (torch 2.14 on this CPU; e.g. a ResNet-8 of width 4, or a ResNet whose stream was pruned to 4
    channels). Such a model trains in the contiguous layout instead; the forward pass is not affected."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 \
                and m.in_channels < 8:
            return False
    return True
