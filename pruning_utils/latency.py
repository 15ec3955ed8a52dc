"""What a pruned network costs on a CPU: parameters, MACs and measured latency (chapters 5 and 6).

API (chapter 6 builds on it; whole-network pruning itself is in :mod:`pruning_utils.prune`):

- :func:`prepare` - an inference copy of a network: BatchNorms folded into the convolutions before them
  (torch.fx), weights in channels_last (NHWC) memory layout; the same function, fewer and faster ops;
- :func:`time_forward` - median wall-clock time of one forward pass of each network, timed in turns
  (round by round, so that load from other processes hits all of them alike) with a fixed number of
  intra-op threads (:func:`runtime.threads`), by default on the computing thread's CPU clock, which
  other processes on a shared machine do not inflate; returns a :class:`Timing` that keeps every round,
  so a latency reduction can be given with an interval over rounds (:meth:`Timing.reduction`);
- :func:`cost_table` - per network: parameters, MACs per image (torch-pruning's count, on the network as
  given, before folding), latency at each batch size, and each reduction relative to the first network;
- :func:`block_scan` - the time of one convolution across output widths, where the CPU kernels' channel
  blocks show as steps (``benchmarks/bench_latency.py --scan``).

Why latency need not follow MACs: oneDNN, the library PyTorch's CPU convolutions call, computes output
channels in blocks (16 or 8 wide on AVX2, 16 on AVX-512, picked per shape), so a width of 20 costs about
what 32 does; per-layer overhead (BatchNorm, ReLU, the residual add, memory traffic, the Python calls)
does not shrink with the MACs of the convolutions, and dominates at batch 1. Pruning the residual stream
too, folding BatchNorms, channels_last and widths rounded to the block (``block`` in
:func:`prune.plan_macs`) close most of the gap at batch 64.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import runtime
from .params import ParameterError, check_choice


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a Conv2d / Linear folded
    into that layer's weights and bias (torch.fx's ``fuse``): the same outputs up to rounding. One deep
    copy (``fuse`` would make a second one of its own)."""
    from torch.fx.experimental.optimization import fuse

    return fuse(copy.deepcopy(model).eval(), inplace=True)


def prepare(model: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """An inference copy of ``model``: BatchNorms folded (``fold_bn``) and 4-D weights in channels_last
    layout (``channels_last``; feed it channels_last inputs, as :func:`time_forward` does)."""
    net = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net.eval()


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x.contiguous()


def _check_timing(repeats, warmup, threads):
    for name, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ParameterError(f"{name}={v!r} is not allowed; expected an int >= {lo}")


@dataclass(frozen=True)
class Timing:
    """Seconds of every timed forward pass: ``seconds[name]`` holds one value per round (all networks ran
    once per round, in turn)."""

    seconds: dict[str, tuple[float, ...]]

    def median_ms(self, name: str) -> float:
        """Median milliseconds of one forward pass of network ``name``."""
        return 1000 * statistics.median(self.seconds[name])

    def reduction(self, name: str, reference: str) -> np.ndarray:
        """Per round, 1 - t(name) / t(reference): the latency reduction, paired within the round."""
        return 1.0 - np.asarray(self.seconds[name]) / np.asarray(self.seconds[reference])

    def reduction_estimate(self, name: str, reference: str, scale: float = 1.0, n_boot: int = 2000,
                           seed: int = 0):
        """The median over rounds of :meth:`reduction` divided by ``scale`` (e.g. the MAC reduction, for
        'latency drop / MAC drop'), with a percentile-bootstrap 95% interval over rounds
        (:class:`claims.Estimate`)."""
        from .claims import Estimate

        r = self.reduction(name, reference) / scale
        rng = np.random.default_rng(seed)
        boot = np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1)
        return Estimate.bootstrap(float(np.median(r)), boot, len(r), method="median over timing rounds, bootstrap")


CLOCKS = ("cpu", "wall")


def time_forward(nets: Mapping[str, nn.Module], x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                 threads: int = 1, channels_last: bool = False, clock: str = "cpu") -> Timing:
    """Time one forward pass on ``x`` of each network (eval mode, inference mode, ``threads`` intra-op
    threads): ``warmup`` untimed passes each, then ``repeats`` rounds in which every network runs once,
    in turn. ``channels_last`` feeds ``x`` in NHWC layout (for networks from :func:`prepare`).

    ``clock="cpu"`` (one thread only) reads the CPU time of the thread that computes: the latency the pass
    has on a core of its own, which time spent waiting for other processes does not inflate (on a shared,
    busy machine the wall clock of a 100 ms pass read 1.1-1.5 s, its CPU time 92-110 ms); ``"wall"``
    reads the wall clock (what a user waits, on a quiet machine the same)."""
    _check_timing(repeats, warmup, threads)
    check_choice("clock", clock, CLOCKS)
    if clock == "cpu" and threads != 1:
        raise ParameterError(f"clock='cpu' times one thread; threads={threads} needs clock='wall'")
    now = time.thread_time if clock == "cpu" else time.perf_counter
    x = _layout(x, channels_last)
    nets = {name: net.eval() for name, net in nets.items()}
    times: dict[str, list[float]] = {name: [] for name in nets}
    with runtime.threads(threads), torch.inference_mode():
        for net in nets.values():
            for _ in range(warmup):
                net(x)
        for _ in range(repeats):
            for name, net in nets.items():
                start = now()
                net(x)
                times[name].append(now() - start)
    return Timing({name: tuple(t) for name, t in times.items()})


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """MACs of one forward pass on ``example_input`` and the parameter count (torch-pruning's count)."""
    from .prune import macs_and_params as count

    return count(model, example_input)


@dataclass(frozen=True)
class Costs:
    """A cost table (one row per network) and the timings behind it (one :class:`Timing` per batch size)."""

    table: pd.DataFrame
    timings: dict[int, Timing]

    def ratio(self, name: str, batch: int, seed: int = 0):
        """Latency drop / MAC drop of network ``name`` against the first network at ``batch``, median over
        timing rounds with a bootstrap interval (:class:`claims.Estimate`)."""
        ref = self.table.index[0]
        mac = float(self.table.loc[name, "MAC reduction"])
        if mac <= 0:
            raise ParameterError(f"network {name!r} has no fewer MACs than {ref!r}; the ratio is undefined")
        return self.timings[batch].reduction_estimate(name, ref, mac, seed=seed)


def cost_table(nets: Mapping[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
               repeats: int = 20, warmup: int = 3, threads: int = 1, seed: int = 0, fold_bn: bool = True,
               channels_last: bool = True, clock: str = "cpu") -> Costs:
    """Parameters and MACs per image of each network (as given), and its median latency at each batch size
    after :func:`prepare` (``fold_bn``, ``channels_last``), timed by ``clock`` (:func:`time_forward`);
    reductions are relative to the first network (the unpruned one), and ``latency drop / MAC drop``
    divides one by the other."""
    if not nets:
        raise ParameterError("nets is empty; give at least the unpruned network")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ParameterError(f"batch_sizes={list(batch_sizes)!r} is not allowed; expected ints >= 1")
    gen = torch.Generator().manual_seed(seed)
    xs = {b: torch.rand(b, *input_shape, generator=gen) for b in batch_sizes}
    rows = {}
    for label, net in nets.items():
        macs, params = macs_and_params(net.eval(), xs[batch_sizes[0]][:1])
        rows[label] = {"params": params, "MACs": macs}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "network"
    ready = {label: prepare(net, fold_bn, channels_last) for label, net in nets.items()}
    timings = {b: time_forward(ready, xs[b], repeats, warmup, threads, channels_last, clock) for b in batch_sizes}
    for b in batch_sizes:
        df[f"latency b{b} (ms)"] = [timings[b].median_ms(n) for n in df.index]
    df["MAC reduction"] = 1 - df["MACs"] / df["MACs"].iloc[0]
    for b in batch_sizes:
        ref = df.index[0]
        df[f"latency reduction b{b}"] = [float(np.median(timings[b].reduction(n, ref))) for n in df.index]
        with np.errstate(divide="ignore", invalid="ignore"):
            df[f"latency drop / MAC drop b{b}"] = np.where(df["MAC reduction"] > 0,
                                                           df[f"latency reduction b{b}"] / df["MAC reduction"],
                                                           np.nan)
    return Costs(df, timings)


def block_scan(in_channels: int, widths: Sequence[int], side: int, batch: int = 64, kernel: int = 3,
               repeats: int = 20, warmup: int = 3, threads: int = 1, seed: int = 0,
               clock: str = "cpu") -> pd.DataFrame:
    """Median milliseconds of one ``kernel`` x ``kernel`` convolution from ``in_channels`` to each output
    width on a batch of ``side`` x ``side`` maps (channels_last), timed in turns, and the time per output
    channel. Steps in the time show the kernel's output-channel blocks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, in_channels, side, side, generator=gen)
    convs = {}
    for w in widths:
        torch.manual_seed(seed)
        convs[f"{w}"] = nn.Conv2d(in_channels, int(w), kernel, padding=kernel // 2, bias=False).to(
            memory_format=torch.channels_last)
    timing = time_forward(convs, x, repeats, warmup, threads, channels_last=True, clock=clock)
    df = pd.DataFrame({"output channels": [int(w) for w in widths],
                       "ms": [timing.median_ms(f"{w}") for w in widths]})
    df["ms per output channel"] = df["ms"] / df["output channels"]
    return df.set_index("output channels")
