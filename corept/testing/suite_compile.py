"""The conformance suite's compile check: a plugin's decoder layers as ``torch.compile`` regions.

One LoRA training step (the fused paths and the fused loss; no checkpointing: the compiled body
under corept's checkpoint is covered by the core tests) with the layers compiled gives the loss
and every adapter gradient of the same step uncompiled,
and compiling them breaks no graph. On a CUDA machine the models run there with inductor (the
GPU twin); elsewhere on CPU with ``backend="aot_eager"`` (Dynamo and AOTAutograd trace, no code
generation; Triton kernels through the interpreter).
"""
from __future__ import annotations

import copy

import torch

import corept
from corept.testing import builders as B
from corept.testing import checks as C
from corept.testing.tolerances import assert_fp32_close


def compile_setting() -> tuple[str, dict]:
    """``(device, torch.compile arguments)`` of the check on this machine."""
    if torch.cuda.is_available():
        return "cuda", {}
    return "cpu", {"backend": "aot_eager"}


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


class CompileChecks:
    """Mixed into :class:`~corept.testing.ConformanceSuite` (its attributes and helpers)."""

    def test_compiled_layers_train_like_eager(self, corept_store, config_name):
        """Loss and every adapter gradient of one LoRA step: layers compiled == uncompiled (fp32),
        no graph break, the report saying the layers are compiled."""
        device, options = compile_setting()
        base = corept_store.base(config_name).to(device)
        targets = B.lora_targets(base, corept_store.arch(config_name))
        batch = {k: v.to(device) for k, v in corept_store.batch(config_name).items()}
        torch._dynamo.reset()
        outcomes = []
        for option in (False, options):
            model = B.add_lora(corept.patch(copy.deepcopy(base), compile=option), patched=True, targets=targets,
                               rank=self.lora_rank, checkpointing=False)
            before = _graph_breaks()
            outcomes.append(C.train_pass(model, batch))
            setting = corept.report(model).settings.get("compile", "")
            if option is not False:
                assert _graph_breaks() == before, f"compiling the layers broke the graph: {_graph_breaks() - before}"
                assert "one region each" in setting and "fell back" not in setting, setting
        eager, compiled = outcomes
        assert_fp32_close("loss", compiled.loss, eager.loss)
        assert eager.grads.keys() == compiled.grads.keys() and eager.grads
        for name, want in eager.grads.items():
            assert want is not None and compiled.grads[name] is not None, name
            assert_fp32_close(name, compiled.grads[name], want)
