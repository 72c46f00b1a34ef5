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
        self._key = tuple(key)
        self._position = {name: i for i, name in enumerate(kernel.arg_names)}
        self._chosen: dict = {}  # cheap key -> the config the autotuner chose for it
        if len(configs) > 1:
            by = {"early_config_prune": prune} if prune is not None else None
            self.tuned = triton.autotune(configs=list(configs), key=list(key), prune_configs_by=by,
                                         do_bench=_bench)(kernel)

    def _cheap_key(self, args: tuple, constexprs: dict) -> tuple:
        """The autotuner's key (the ``key`` arguments' values and every tensor argument's dtype),
        as plain tuples: no dict of all arguments, no ``str`` of each dtype."""
        values = tuple(constexprs[n] if n in constexprs else args[self._position[n]] for n in self._key)
        dtypes = tuple(a.dtype for a in args if hasattr(a, "dtype"))
        return values, dtypes, tuple(v.dtype for v in constexprs.values() if hasattr(v, "dtype"))

    def __call__(self, grid: Callable[[dict], tuple], device: torch.device, *args,
                 default_warps: int | None = None, **constexprs) -> dict:
        """Launch over ``grid(meta)``; ``default_warps`` overrides the default config's off CUDA.

        On CUDA the first call per key goes through Triton's autotuner (which times the configs
        once); later calls launch the kernel with the config it chose, skipping the autotuner's
        per-call Python (it built a dict of every argument and a string of every dtype: ~290
        launches per training step of an 8B model went through it).

        :returns: the meta-parameters of the launch that wrote the outputs (``grid(meta)`` is
            the grid it ran on).
        """
        if self.tuned is not None and device.type == "cuda" and not interpreter_active():
            key = self._cheap_key(args, constexprs)
            config = self._chosen.get(key)
            if config is None:
                self.tuned[grid](*args, **constexprs)
                config = self.tuned.best_config
                if config.pre_hook is None:
                    self._chosen[key] = config
                return {**config.kwargs, **constexprs}
            meta = {**config.kwargs, **constexprs}
            self.kernel[grid(meta)](*args, **constexprs, **config.all_kwargs())
            return meta
        meta = {**self.default.kwargs, **constexprs}
        self.kernel[grid(meta)](*args, **meta, num_warps=default_warps or self.default.num_warps,
                                 num_stages=self.default.num_stages)
        return meta

    def best(self) -> triton.Config | None:
        """The config the last CUDA call used (None before one / off CUDA)."""
        return getattr(self.tuned, "best_config", None)
