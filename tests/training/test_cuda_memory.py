"""``corept train``'s allocator default: expandable segments unless the user chose a setting."""
from __future__ import annotations

import argparse

import pytest

from corept.training import cuda_memory


@pytest.fixture
def no_user_setting(monkeypatch):
    for var in cuda_memory._USER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_sets_expandable_segments_when_unset(no_user_setting):
    import os

    assert cuda_memory.prefer_expandable_segments() == cuda_memory.EXPANDABLE
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("var", cuda_memory._USER_VARS)
def test_user_setting_wins(monkeypatch, var):
    import os

    for v in cuda_memory._USER_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "max_split_size_mb:128")
    assert cuda_memory.prefer_expandable_segments() is None
    assert os.environ[var] == "max_split_size_mb:128"
    assert var == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_train_command_sets_it_before_training(no_user_setting, monkeypatch):
    import os

    import corept.training.run as run_mod
    from corept.cli import train as train_cmd

    seen = {}

    def fake_run_training(opts):
        seen["conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        return run_mod.RunResult(options=opts, output=opts.output)

    monkeypatch.setattr(run_mod, "run_training", fake_run_training)
    monkeypatch.setattr(train_cmd, "options_from_args", lambda args: argparse.Namespace(output="x"))
    assert train_cmd.run(argparse.Namespace()) == 0
    assert seen["conf"] == "expandable_segments:True"
