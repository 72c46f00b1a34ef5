"""``use_gradient_checkpointing="auto"``: the planner decides per batch shape to keep or recompute.

The decision needs a CUDA tensor and a GPU profile; here the GPU is a planner profile of a chosen
size (``detect_gpu`` stubbed) and the "CUDA" hidden states a CPU tensor subclass that says it is
on CUDA, so the rule itself (the planner's ``checkpointing="none"`` estimate against the budget),
the per-shape cache, the budget override and the report line are checked on CPU. The GPU
benchmark measures what it buys (bench/run_e2e_h200.sh).
"""
from __future__ import annotations

import pytest
import torch

import corept
import corept.planning as planning
from corept.planning.gpus import GpuProfile
from corept.training import checkpointing as ck
from corept.training.recompute_policy import AutoPolicy
import tiny


class _OnCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def _hidden(b, s, h=64):
    return torch.Tensor._make_subclass(_OnCuda, torch.randn(b, s, h))


@pytest.fixture
def lora_model():
    model = tiny.tiny_model("llama")
    return corept.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="auto")


@pytest.fixture
def gpu_of(monkeypatch):
    def use(gib):
        monkeypatch.setattr(planning, "detect_gpu", lambda index=0: GpuProfile("cuda:0", f"test GPU {gib} GiB", gib))
    return use


def test_keeps_when_the_planner_says_it_fits_and_recomputes_when_not(lora_model, gpu_of):
    gpu_of(80.0)
    policy = AutoPolicy(lora_model)
    assert policy.keep(_hidden(2, 16)) is True
    (decision,) = policy.decisions.values()
    assert decision.keep and decision.required_gib < decision.budget_gib
    shape = planning.model_shape(lora_model.config)
    est = planning.estimate(shape, method="lora", seq=16, batch=2, r=4, checkpointing="none",
                            gpu=GpuProfile("cuda:0", "x", 80.0))
    assert decision.required_gib == round(est.required / 2**30, 2)  # the planner's figure, as `corept plan` gives it

    tight = AutoPolicy(lora_model, memory_budget_gib=est.required / 2**30)  # the step alone: no room for margins
    assert tight.keep(_hidden(2, 16)) is False
    assert "recompute" in tight.describe() and "memory_budget_gib=" in tight.describe()


def test_keeps_the_last_layers_that_fit_between_the_two_estimates(gpu_of):
    """A budget between "all recomputed" and "all kept": the last K layers keep their activations."""
    from corept.planning.estimate import DEFAULT_MARGIN
    from corept.planning.recompute import AUTO_HEADROOM

    gpu_of(80.0)
    big = tiny.tiny_model("llama", num_hidden_layers=6)  # more layers: K strictly between 0 and L
    pm = corept.get_peft_model(big, r=4, lora_alpha=8, use_gradient_checkpointing="auto")
    shape = planning.model_shape(pm.config)
    profile = GpuProfile("cuda:0", "x", 80.0)
    kept, lean = (planning.estimate(shape, method="lora", seq=16, batch=2, r=4, checkpointing=c, gpu=profile)
                  for c in ("none", "corept"))
    per_layer = (kept.required - lean.required) / shape.layers
    usable = (lean.required + 2.5 * per_layer) / (1 - DEFAULT_MARGIN) / (1 - AUTO_HEADROOM) / 2**30
    policy = AutoPolicy(pm, memory_budget_gib=usable)
    layers = list(pm.get_base_model().model.layers)
    assert len(layers) == shape.layers == 6
    keeps = [policy.keep(_hidden(2, 16), layer) for layer in layers]
    (decision,) = policy.decisions.values()
    assert decision.keep_layers == 2 and keeps == [False] * 4 + [True] * 2, (decision, keeps)
    assert "keep the last 2 of 6 layers" in policy.describe()


def test_decides_once_per_batch_shape(lora_model, gpu_of, monkeypatch):
    gpu_of(80.0)
    import corept.planning.recompute as recompute

    calls = []
    real = recompute.estimate
    monkeypatch.setattr(recompute, "estimate", lambda *a, **k: calls.append(k) or real(*a, **k))
    policy = AutoPolicy(lora_model)
    for _ in range(3):
        policy.keep(_hidden(2, 16))
    policy.keep(_hidden(1, 40))
    assert [(c["batch"], c["seq"], c["checkpointing"]) for c in calls] == [
        (2, 16, "none"), (2, 16, "corept"), (1, 40, "none"), (1, 40, "corept")]
    assert set(policy.decisions) == {(2, 16), (1, 40)}


def test_off_cuda_every_call_recomputes(lora_model):
    policy = AutoPolicy(lora_model)
    assert policy.keep(torch.randn(2, 16, 64)) is False and policy.decisions == {}


def test_bad_budget_and_mode_combinations_are_refused(lora_model):
    with pytest.raises(ValueError, match="memory_budget_gib must be positive"):
        AutoPolicy(lora_model, memory_budget_gib=0)
    with pytest.raises(ValueError, match="applies to use_gradient_checkpointing='auto' only"):
        ck.enable_checkpointing(lora_model, "corept", memory_budget_gib=10)


def test_kept_calls_skip_the_checkpoint_and_train_alike(lora_model):
    """A kept call runs the layer with autograd as usual: same loss and gradients as the recompute."""
    class Always:
        def __init__(self, answer):
            self.answer = answer

        def keep(self, hidden, layer=None):
            return self.answer

        def describe(self):
            return f"always {self.answer}"

    ids, labels = tiny.batch()
    results = []
    for answer in (True, False):
        func = ck.make_checkpoint_func(offload=False, policy=Always(answer))
        ck._install(lora_model.get_base_model(), func)
        lora_model.train()
        lora_model.zero_grad(set_to_none=True)
        loss = lora_model(input_ids=ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}))
    (l_keep, g_keep), (l_rec, g_rec) = results
    assert torch.equal(l_keep, l_rec)
    for name in g_rec:
        assert tiny.mismatch(g_keep[name], g_rec[name], rtol=1e-6, atol=1e-7) is None, name
    assert corept.report(lora_model).settings["checkpointing"].endswith("always False")


def test_report_names_auto_mode(lora_model):
    assert "auto (no batch yet)" in corept.report(lora_model).settings["checkpointing"]
