"""Launch-configuration tuning shared by the kernels: Triton's autotuner on CUDA, fixed configs elsewhere.

On a GPU the best ``num_warps`` / programs-per-SM of a memory-bound kernel depends on the chip and
the row width (measured on an H200: a fixed choice left the norms' backward latency-bound at a third
of the copy bandwidth). :func:`launcher` times a small set of configs once per key (Triton's
``autotune``, a few milliseconds each) and reuses the winner; under ``TRITON_INTERPRET=1`` (CPU,
tests) it runs the one default config, so the interpreter never benchmarks.

Kernels tuned here must be idempotent for one set of arguments (every output fully overwritten,
nothing accumulated in place): the autotuner runs each candidate on the real arguments.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import triton

from corept_kernels.capabilities import interpreter_active

#: Timing per candidate config (ms). Short: the kernels tuned here run in tens of microseconds.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def _bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


class Launcher:
    """Calls a ``@triton.jit`` kernel with a tuned config on CUDA, ``default`` elsewhere.

    :param kernel: the jitted kernel.
    :param configs: candidate ``triton.Config`` s (their kwargs are extra constexpr meta-parameters).
    :param default: the config used off CUDA (and when ``configs`` is empty).
    :param key: argument names whose values select a tuning entry (tensor dtypes are added).
    :param prune: optional ``prune(configs, named_args, **kwargs) -> configs`` run before timing.
    """

    def __init__(self, kernel, configs: Sequence[triton.Config], default: triton.Config,
                 key: Sequence[str], prune: Callable | None = None):
        self.kernel, self.default = kernel, default
        self.tuned = None
        if len(configs) > 1:
            by = {"early_config_prune": prune} if prune is not None else None
            self.tuned = triton.autotune(configs=list(configs), key=list(key), prune_configs_by=by,
                                         do_bench=_bench)(kernel)

    def __call__(self, grid: Callable[[dict], tuple], device: torch.device, *args,
                 default_warps: int | None = None, **constexprs) -> dict:
        """Launch over ``grid(meta)``; ``default_warps`` overrides the default config's off CUDA.

        :returns: the meta-parameters of the launch that wrote the outputs (``grid(meta)`` is
            the grid it ran on).
        """
        if self.tuned is not None and device.type == "cuda" and not interpreter_active():
            self.tuned[grid](*args, **constexprs)
            return {**self.tuned.best_config.kwargs, **constexprs}
        meta = {**self.default.kwargs, **constexprs}
        self.kernel[grid(meta)](*args, **meta, num_warps=default_warps or self.default.num_warps,
                                 num_stages=self.default.num_stages)
        return meta

    def best(self) -> triton.Config | None:
        """The config the last CUDA call used (None before one / off CUDA)."""
        return getattr(self.tuned, "best_config", None)
