"""``ConformanceSuite``: the checks every architecture plugin runs against the installed HF model.

A plugin's test module subclasses it and names its tiny configs::

    from corept.testing import ConformanceSuite, tiny_config

    class TestLlama(ConformanceSuite):
        plugin = "llama"
        configs = {"gqa": lambda: tiny_config("llama", tie_word_embeddings=False)}

Every check builds a patched model and an unpatched ``deepcopy`` of the same weights (the live
reference) and compares whole tensors: fp32 tightly, bf16 against an fp32 gold copy
(:mod:`corept.testing.tolerances`). The numerical checks are in :mod:`.suite_numerics`, the
contract checks (declarations, report, signatures, undo) in :mod:`.suite_contract`; the matrix and
its pruning in :mod:`corept.testing.cases`. Base models are built once per class and deep-copied
per check.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

import corept
from corept.testing import builders as B
from corept.testing import checks as C
from corept.testing.cases import MatrixCase, full_cases, quirk_cases
from corept.testing.interpreter import nearest_bf16_rounding
from corept.testing.store import Store, glob
from corept.testing.suite_compile import CompileChecks
from corept.testing.suite_contract import ContractChecks
from corept.testing.suite_export import ExportChecks
from corept.testing.suite_grpo import GRPOChecks
from corept.testing.suite_numerics import NumericChecks
from corept.testing.suite_packing import PackingChecks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ConformanceSuite(ContractChecks, NumericChecks, ExportChecks, CompileChecks, PackingChecks, GRPOChecks):
    """Subclass with a ``Test`` name and set :attr:`configs`; everything else has defaults.

    :cvar configs: ``{name: () -> config}``; each must force GQA > 1, head_dim != hidden/heads and
        a vocabulary that is not a power of two (checked), plus the architecture's quirks.
        ``corept.testing.tiny_config`` also moves every scalar multiplier / scale / softcap field
        off its default.
    :cvar plugin: the plugin name that must own these configs (``corept.report(m).plugin``).
    :cvar model_classes: ``{name: transformers class name}`` (default ``AutoModelForCausalLM``).
    :cvar expected_quirks: ``{name: {quirk: value}}`` the resolved quirks must show.
    :cvar quirk_probes: ``{name: {config attr: value}}``: setting the attribute to the value must
        change the reference logits, proving the tiny config exercises that quirk.
    :cvar expect_applied: ``{name: components}`` that must be patched (default: the declared
        components).
    :cvar full_matrix: config names given the full matrix (default: the first config).
    :cvar convergence: config names given the LoRA convergence check (default: the first).
    :cvar compiled: config names given the compiled-layers check (default: the first).
    :cvar packed: config names given the packing checks (default: the first; add the configs whose
        attention differs: sliding windows, softcapping).
    :cvar grpo: config names given the GRPO checks (TRL's ``GRPOTrainer`` loss; default: the first).
    :cvar skip: ``{test id glob: reason}``: not run; every skip carries its reason.
    :cvar known_failures: ``{test id glob: reason}``: run as non-strict xfail (an XPASS shows when
        the case happens to pass); empty by default.
    """

    configs: dict[str, Callable] = {}
    plugin: str | None = None
    model_classes: dict[str, str] = {}
    expected_quirks: dict[str, dict] = {}
    quirk_probes: dict[str, dict] = {}
    expect_applied: dict[str, tuple] = {}
    full_matrix: tuple[str, ...] | None = None
    convergence: tuple[str, ...] | None = None
    compiled: tuple[str, ...] | None = None
    packed: tuple[str, ...] | None = None
    grpo: tuple[str, ...] | None = None
    skip: dict[str, str] = {}
    known_failures: dict[str, str] = {}
    seed = 0
    batch_size = 2
    seq_len = 8
    new_tokens = 4
    lora_rank = 4
    convergence_steps = 12
    convergence_lr = 1e-2
    convergence_rtol = 1e-4
    interpreter_bf16_rounding = "nearest"
    torch_threads = 1

    # -- parametrization (pytest calls this per test function of the class) ------------------------------
    @classmethod
    def matrix(cls) -> list[MatrixCase]:
        names = list(cls.configs)
        full = cls.full_matrix if cls.full_matrix is not None else names[:1]
        return [c for n in names for c in (full_cases(n, cls._declares_experts(n)) if n in full else quirk_cases(n))]

    @classmethod
    def _declares_experts(cls, name: str) -> bool:
        try:
            return bool(B.architecture_of(cls.configs[name]()).roles.experts)
        except AssertionError:  # no plugin claims it: the contract checks say so
            return False

    def pytest_generate_tests(self, metafunc):
        cls = metafunc.cls
        names = list(cls.configs)
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", cls.matrix(), ids=lambda c: c.id)
        elif "config_name" in metafunc.fixturenames:
            fn = metafunc.function.__name__
            if fn == "test_convergence":
                names = list(cls.convergence if cls.convergence is not None else names[:1])
            elif fn == "test_compiled_layers_train_like_eager":
                names = list(cls.compiled if cls.compiled is not None else names[:1])
            elif fn.startswith("test_packed_documents"):
                names = list(cls.packed if cls.packed is not None else names[:1])
            elif fn.startswith("test_grpo_step"):
                names = list(cls.grpo if cls.grpo is not None else names[:1])
            elif fn == "test_quirk_is_exercised":
                names = [n for n in names if cls.quirk_probes.get(n)]
            metafunc.parametrize("config_name", names)

    @pytest.fixture(scope="class")
    @classmethod
    def corept_store(cls, tmp_path_factory):
        """Configs, base models and saved folders, built once per class."""
        return Store(cls, tmp_path_factory)

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _corept_gpu_rounding(cls):
        """Under the Triton interpreter, fp32 -> bf16 rounds to nearest as on a GPU (see
        :mod:`corept.testing.interpreter`); ``interpreter_bf16_rounding = "truncate"`` opts out."""
        if cls.interpreter_bf16_rounding == "truncate":
            yield False
            return
        with nearest_bf16_rounding() as adjusted:
            yield adjusted

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _corept_torch_threads(cls):
        """``torch_threads`` intra-op threads while the class runs (default 1): the tensors are
        tiny, and on a busy machine torch's spinning thread pool makes them 10-100x slower."""
        before = torch.get_num_threads()
        if cls.torch_threads:
            torch.set_num_threads(cls.torch_threads)
        yield
        torch.set_num_threads(before)

    @pytest.fixture(autouse=True)
    def _corept_known_skips(self, request):
        for pattern, reason in type(self).skip.items():
            if glob(request.node.name, pattern):
                pytest.skip(reason)
        for pattern, reason in type(self).known_failures.items():
            if glob(request.node.name, pattern):
                request.applymarker(pytest.mark.xfail(reason=reason, strict=False))

    # -- helpers ---------------------------------------------------------------------------------------
    def models(self, store: Store, case: MatrixCase):
        """``(patched, reference, gold)`` for ``case``; ``gold`` is the fp32 copy for bf16 cases."""
        dtype = DTYPES[case.dtype]
        base, cls_name = store.base(case.config), self.model_classes.get(case.config)
        if case.quant == "4bit":
            ref = B.load_4bit(store.folder(case.config), dtype, cls_name)
            pat = B.load_4bit(store.folder(case.config), dtype, cls_name)
            gold = B.dequantized_fp32(base, ref) if dtype != torch.float32 else None
        else:
            ref = copy.deepcopy(base).to(dtype)
            pat = copy.deepcopy(base).to(dtype)
            gold = B.to_fp32_gold(ref) if dtype != torch.float32 else None
        corept.patch(pat, only=case.only)
        if case.lora:
            kw = dict(targets=B.lora_targets(base, store.arch(case.config)), rank=self.lora_rank)
            ref = B.add_lora(ref, patched=False, checkpointing=case.ckpt, **kw)
            pat = B.add_lora(pat, patched=True, checkpointing=case.ckpt, **kw)
            gold = B.add_lora(gold, patched=False, checkpointing=False, **kw) if gold is not None else None
        elif case.ckpt:
            B.enable_reference_checkpointing(ref)
            B.enable_patched_checkpointing(pat)
        return pat, ref, gold

    def applied_components(self, store: Store, name: str) -> tuple:
        if name in self.expect_applied:
            return tuple(self.expect_applied[name])
        return tuple(store.arch(name).components)

    def run_case(self, model, batch: dict, case: MatrixCase, nib: bool) -> C.Outcome:
        out = C.Outcome()
        if not case.ckpt:
            out.logits = C.eval_logits(model, batch)
        res = C.train_pass(model, batch)
        out.loss, out.grads, out.logits_in_training = res.loss, res.grads, res.logits_in_training
        if nib:
            out.loss_nib = C.train_pass(model, batch, backward=False, nib=True).loss_nib
        return out
