"""The tuned launcher: the autotuner decides once per key, later calls launch its choice directly."""
from __future__ import annotations

import torch
import triton

import corept_kernels.tuning as tuning


class FakeKernel:
    """Stands in for a ``@triton.jit`` kernel: records launches instead of running."""

    arg_names = ["X", "Y", "H", "BACKWARD", "BLOCK"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


class FakeAutotuner:
    """Picks a config per (H, BACKWARD, dtypes) like Triton's autotuner; counts its calls."""

    def __init__(self, kernel, configs):
        self.kernel, self.configs, self.calls, self.best_config = kernel, configs, 0, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls += 1
            self.best_config = self.configs[args[2] % len(self.configs)]
            meta = {**self.best_config.kwargs, **kwargs}
            self.kernel[grid(meta)](*args, **kwargs, **self.best_config.all_kwargs())
        return run


def test_the_autotuner_runs_once_per_key_then_its_choice_launches_directly(monkeypatch):
    monkeypatch.setattr(tuning, "interpreter_active", lambda: False)
    kernel = FakeKernel()
    configs = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)]
    launcher = tuning.Launcher(kernel, configs[:1], configs[0], key=["H", "BACKWARD"])  # one config: no autotuner
    launcher.tuned = fake = FakeAutotuner(kernel, configs)
    cuda = torch.device("cuda")

    def grid(meta):
        return (meta["BLOCK"],)

    x32, x16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    metas = [launcher(grid, cuda, x32, x32, 5, BACKWARD=False) for _ in range(3)]
    assert fake.calls == 1 and metas == [{"BLOCK": 128, "BACKWARD": False}] * 3
    assert [g for g, _, _ in kernel.launches] == [(128,)] * 3
    assert kernel.launches[1][2] == kernel.launches[0][2]  # same constexprs and launch options
    assert kernel.launches[1][2]["num_warps"] == 8
    launcher(grid, cuda, x32, x32, 5, BACKWARD=True)  # another key value: the autotuner decides
    launcher(grid, cuda, x16, x32, 5, BACKWARD=False)  # another dtype: the autotuner decides
    launcher(grid, cuda, x32, x32, 4, BACKWARD=False)
    assert fake.calls == 4 and kernel.launches[-1][0] == (64,)
    launcher(grid, cuda, x16, x32, 5, BACKWARD=False)
    assert fake.calls == 4


def test_off_cuda_the_default_config_launches(monkeypatch):
    kernel = FakeKernel()
    configs = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)]
    launcher = tuning.Launcher(kernel, configs[:1], triton.Config({"BLOCK": 32}, num_warps=2), key=["H"])
    launcher.tuned = FakeAutotuner(kernel, configs)  # present, but off CUDA it is not asked
    meta = launcher(lambda m: (m["BLOCK"],), torch.device("cpu"), torch.zeros(1), torch.zeros(1), 3, BACKWARD=False)
    assert meta == {"BLOCK": 32, "BACKWARD": False} and kernel.launches[0][0] == (32,)
    assert kernel.launches[0][2]["num_warps"] == 2
