"""``ConformanceSuite``: the checks every architecture plugin runs against the installed HF model.

A plugin's test module subclasses it and names its tiny configs::

    from corept.testing import ConformanceSuite, tiny_config

    class TestLlama(ConformanceSuite):
        plugin = "llama"
        configs = {"gqa": lambda: tiny_config("llama", tie_word_embeddings=False)}

Every check builds a patched model and an unpatched ``deepcopy`` of the same weights (the live
reference) and compares whole tensors: fp32 tightly, bf16 against an fp32 gold copy
(:mod:`corept.testing.tolerances`). The matrix and its pruning are in :mod:`corept.testing.cases`.
Base models are built once per class and deep-copied per check.
"""
from __future__ import annotations

import copy
import re
from typing import Callable

import pytest
import torch

import corept
from corept.testing import builders as B
from corept.testing import checks as C
from corept.testing.cases import MatrixCase, full_cases, quirk_cases
from corept.testing.interpreter import nearest_bf16_rounding
from corept.testing.tolerances import scaled_error

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _glob(name: str, pattern: str) -> bool:
    """``*`` matches anything; every other character (``[`` included) is literal."""
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), name) is not None


def _same(a, b) -> bool:
    """Bitwise equal tensors, or both ``None`` (a parameter no loss reaches, e.g. a vision tower)."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class _Store:
    """Per-class cache: configs, fp32 base models, saved folders (for 4-bit loads)."""

    def __init__(self, suite: type, tmp_path_factory):
        self.suite, self.tmp = suite, tmp_path_factory
        self._configs, self._bases, self._folders = {}, {}, {}

    def config(self, name: str):
        if name not in self._configs:
            self._configs[name] = self.suite.configs[name]()
        return copy.deepcopy(self._configs[name])

    def base(self, name: str):
        if name not in self._bases:
            self._bases[name] = B.build_base(self.config(name), self.suite.model_classes.get(name), self.suite.seed)
        return self._bases[name]

    def arch(self, name: str):
        return B.architecture_of(self.config(name))[0]

    def folder(self, name: str):
        if name not in self._folders:
            self._folders[name] = B.save_folder(self.base(name), self.tmp.mktemp(f"corept-{name}"))
        return self._folders[name]

    def batch(self, name: str, seed: int = 1) -> dict:
        return B.make_batch(B.vocab_size(self.base(name)), self.suite.batch_size, self.suite.seq_len, seed)


class ConformanceSuite:
    """Subclass with a ``Test`` name and set :attr:`configs`; everything else has defaults.

    :cvar configs: ``{name: () -> config}``; each must force GQA > 1, head_dim != hidden/heads and
        a vocabulary that is not a power of two (checked), plus the architecture's quirks.
    :cvar plugin: the plugin name that must own these configs (``corept.report(m).plugin``).
    :cvar model_classes: ``{name: transformers class name}`` (default ``AutoModelForCausalLM``).
    :cvar expected_quirks: ``{name: {quirk: value}}`` the resolved quirks must show.
    :cvar quirk_probes: ``{name: {config attr: value}}``: setting the attribute to the value must
        change the reference logits, proving the tiny config exercises that quirk.
    :cvar expect_applied: ``{name: components}`` that must be patched (default: the declared
        components but ``attention``, which the built-in plugins leave to transformers).
    :cvar full_matrix: config names given the full matrix (default: the first config).
    :cvar convergence: config names given the LoRA convergence check (default: the first).
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
    skip: dict[str, str] = {}
    known_failures: dict[str, str] = {}
    seed = 0
    batch_size = 2
    seq_len = 8
    new_tokens = 4
    lora_rank = 4
    convergence_steps = 20
    convergence_lr = 1e-2
    convergence_rtol = 1e-4
    interpreter_bf16_rounding = "nearest"
    torch_threads = 1

    # -- parametrization (pytest calls this per test function of the class) ------------------------------
    @classmethod
    def matrix(cls) -> list[MatrixCase]:
        names = list(cls.configs)
        full = cls.full_matrix if cls.full_matrix is not None else names[:1]
        return [c for n in names for c in (full_cases(n) if n in full else quirk_cases(n))]

    def pytest_generate_tests(self, metafunc):
        cls = metafunc.cls
        names = list(cls.configs)
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", cls.matrix(), ids=lambda c: c.id)
        elif "config_name" in metafunc.fixturenames:
            fn = metafunc.function.__name__
            if fn == "test_convergence":
                names = list(cls.convergence if cls.convergence is not None else names[:1])
            elif fn == "test_quirk_is_exercised":
                names = [n for n in names if cls.quirk_probes.get(n)]
            metafunc.parametrize("config_name", names)

    @pytest.fixture(scope="class")
    @classmethod
    def corept_store(cls, tmp_path_factory):
        """Configs, base models and saved folders, built once per class."""
        return _Store(cls, tmp_path_factory)

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
            if _glob(request.node.name, pattern):
                pytest.skip(reason)
        for pattern, reason in type(self).known_failures.items():
            if _glob(request.node.name, pattern):
                request.applymarker(pytest.mark.xfail(reason=reason, strict=False))

    # -- helpers ---------------------------------------------------------------------------------------
    def models(self, store: _Store, case: MatrixCase):
        """``(patched, reference, gold)`` for ``case``; ``gold`` is the fp32 copy for bf16 cases."""
        dtype = _DTYPES[case.dtype]
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
            targets = B.lora_targets(base, store.arch(case.config))
            kw = dict(targets=targets, rank=self.lora_rank)
            ref = B.add_lora(ref, patched=False, checkpointing=case.ckpt, **kw)
            pat = B.add_lora(pat, patched=True, checkpointing=case.ckpt, **kw)
            gold = B.add_lora(gold, patched=False, checkpointing=False, **kw) if gold is not None else None
        elif case.ckpt:
            B.enable_reference_checkpointing(ref)
            B.enable_patched_checkpointing(pat)
        return pat, ref, gold

    def applied_components(self, store: _Store, name: str) -> tuple:
        if name in self.expect_applied:
            return tuple(self.expect_applied[name])
        return tuple(c for c in store.arch(name).components if c != "attention")

    def run_case(self, model, batch: dict, case: MatrixCase, nib: bool) -> C.Outcome:
        out = C.Outcome()
        if not case.ckpt:
            out.logits = C.eval_logits(model, batch)
        res = C.train_pass(model, batch)
        out.loss, out.grads = res.loss, res.grads
        if nib:
            out.loss_nib = C.train_pass(model, batch, backward=False, nib=True).loss_nib
        return out

    # -- the checks --------------------------------------------------------------------------------------
    def test_config_is_demanding(self, corept_store, config_name):
        """GQA > 1, head_dim != hidden/heads, non-power-of-two vocab, seq > any sliding window."""
        text = corept_store.config(config_name).get_text_config()
        heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        problems = []
        if not heads // kv > 1:
            problems.append(f"GQA: {heads} query heads / {kv} kv heads")
        if head_dim == text.hidden_size // heads:
            problems.append(f"head_dim {head_dim} == hidden {text.hidden_size} / heads {heads}")
        if text.vocab_size & (text.vocab_size - 1) == 0:
            problems.append(f"vocab {text.vocab_size} is a power of two")
        window = corept_store.arch(config_name).quirks.resolve(text).sliding_window
        layer_types = getattr(text, "layer_types", None) or ["sliding_attention"]
        used = "sliding_attention" in layer_types and getattr(text, "use_sliding_window", True) is not False
        if window and used and self.seq_len <= window:
            problems.append(f"seq_len {self.seq_len} <= sliding_window {window}: the window never bites")
        assert not problems, f"{config_name}: tiny config does not force: {problems}"

    def test_declaration_and_report(self, corept_store, config_name):
        """The right plugin owns it, quirks resolve as expected, components apply with Triton kernels."""
        model = corept.patch(copy.deepcopy(corept_store.base(config_name)))
        rep = corept.report(model)
        if self.plugin is not None:
            assert rep.plugin == self.plugin, rep
        for quirk, value in self.expected_quirks.get(config_name, {}).items():
            assert rep.quirks[quirk] == value, f"quirk {quirk}: {rep.quirks[quirk]!r} != expected {value!r}"
        from corept_kernels import interpreter_active

        triton_possible = interpreter_active() or torch.cuda.is_available()
        for comp in self.applied_components(corept_store, config_name):
            assert comp in rep.applied, f"{comp} not applied; fallbacks: {rep.fallbacks}"
            if triton_possible:
                assert all(p.startswith("triton:") for p in rep.applied[comp].split(", ")), rep.applied
        for comp, why in rep.fallbacks.items():
            assert why and isinstance(why, str), f"fallback {comp} has no reason"
        forced = corept_store.arch(config_name).quirks.forced_attn_implementation
        if forced:  # the kit builds models the way corept.load does
            assert model.config._attn_implementation == forced, model.config._attn_implementation

    def test_quirk_is_exercised(self, corept_store, config_name):
        """Changing each probed config attribute changes the reference logits (so a patch that
        ignored the quirk would fail the matrix)."""
        batch = corept_store.batch(config_name)
        ref = C.eval_logits(corept_store.base(config_name), batch)
        for attr, value in self.quirk_probes[config_name].items():
            cfg = corept_store.config(config_name)
            for c in {id(cfg): cfg, id(cfg.get_text_config()): cfg.get_text_config()}.values():
                setattr(c, attr, value)
            changed = B.build_base(cfg, self.model_classes.get(config_name), self.seed)
            err = scaled_error(C.eval_logits(changed, batch), ref)
            assert err > 1e-3, f"{attr}={value!r} changes the logits by only {err:.2e}: the quirk is not exercised"

    def test_matrix(self, corept_store, case):
        """Logits, loss (-100 labels, num_items_in_batch), every trainable gradient: patched vs reference."""
        pat, ref, gold = self.models(corept_store, case)
        rep = corept.report(pat)
        batch = corept_store.batch(case.config)
        nib = case.patch in ("all", "loss")
        got, want = self.run_case(pat, batch, case, nib), self.run_case(ref, batch, case, nib)
        applied = [c for c in rep.applied if c not in ("lora", "checkpointing")]
        if not applied and not case.lora and not case.ckpt:
            # nothing was patched for this selection (e.g. attention on AttentionInterface): bitwise
            assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
            assert all(_same(got.grads[n], want.grads[n]) for n in want.grads)
            assert case.patch not in self.applied_components(corept_store, case.config), rep
            return
        if case.patch != "all":
            assert case.patch in rep.applied, f"{case.patch} selected but not applied: {rep.fallbacks}"
        if case.lora:
            assert "lora" in rep.applied or rep.fallbacks.get("lora"), rep
            C.assert_state_dict_equal(pat.state_dict(), ref.state_dict(), "LoRA model")
        compared = C.compare(got, want, self.run_case(gold, batch, case, nib) if gold is not None else None)
        assert compared >= sum(g is not None for g in want.grads.values()) + 1

    def test_generate_greedy(self, corept_store, config_name):
        """Greedy generate() with the KV cache (left padding): the same tokens as the reference."""
        base = corept_store.base(config_name)
        batch = B.generation_batch(B.vocab_size(base), self.batch_size, self.seq_len)
        want = C.greedy(copy.deepcopy(base), batch, self.new_tokens)
        got = C.greedy(corept.patch(copy.deepcopy(base)), batch, self.new_tokens)
        assert got.shape == want.shape == (self.batch_size, self.seq_len + self.new_tokens)
        assert torch.equal(got, want), f"patched {got.tolist()} != reference {want.tolist()}"

    def test_unpatch_identity(self, corept_store, config_name):
        """patch -> run -> unpatch leaves every module as before and outputs bitwise equal."""
        base = corept_store.base(config_name)
        model, never = copy.deepcopy(base), copy.deepcopy(base)
        before = C.instance_state(model)
        corept.patch(model)
        assert C.instance_state(model) != before, "patch changed nothing"
        batch = corept_store.batch(config_name)
        C.eval_logits(model, batch)
        corept.unpatch(model)
        assert C.instance_state(model) == before, "unpatch left instance attributes changed"
        assert not corept.is_patched(model)
        assert torch.equal(C.eval_logits(model, batch), C.eval_logits(never, batch))
        got, want = C.train_pass(model, batch), C.train_pass(never, batch)
        assert torch.equal(got.loss, want.loss)
        assert all(_same(got.grads[n], want.grads[n]) for n in want.grads)

    def test_patch_idempotent(self, corept_store, config_name):
        """Patching twice changes nothing more (same objects, same report); one unpatch undoes it."""
        model = copy.deepcopy(corept_store.base(config_name))
        before = C.instance_state(model)
        corept.patch(model)
        once, rep = C.instance_state(model), copy.deepcopy(corept.report(model).to_dict())
        corept.patch(model)
        corept.patch(model, only=["norm"])  # a different selection is refused (warned), not stacked
        assert C.instance_state(model) == once
        assert corept.report(model).to_dict() == rep
        corept.unpatch(model)
        assert C.instance_state(model) == before

    def test_state_dict_unchanged(self, corept_store, config_name):
        """Patching adds, removes and changes no parameter or buffer, before and after a forward."""
        base = corept_store.base(config_name)
        model = corept.patch(copy.deepcopy(base))
        C.assert_state_dict_equal(model.state_dict(), base.state_dict(), "patched")
        C.train_pass(model, corept_store.batch(config_name), backward=False)
        C.assert_state_dict_equal(model.state_dict(), base.state_dict(), "patched after a forward")
        assert [n for n, _ in model.named_buffers()] == [n for n, _ in base.named_buffers()]

    def test_load_applies_policies(self, corept_store, config_name):
        """``corept.load`` of a saved copy picks this plugin, forces the declared attention, patches."""
        if self.model_classes.get(config_name):
            pytest.skip("corept.load builds AutoModelForCausalLM; this config names another class")
        model, tok = corept.load(str(corept_store.folder(config_name)), dtype="fp32")
        arch = corept_store.arch(config_name)
        assert corept.report(model).plugin == (self.plugin or corept.report(model).plugin)
        assert corept.report(model).patched
        forced = arch.quirks.forced_attn_implementation
        if forced:
            assert model.config._attn_implementation == forced

    def test_convergence(self, corept_store, config_name):
        """20 LoRA steps (AdamW) patched vs unpatched from one seed on the same batches: per-step
        losses agree (fp32, rtol ``convergence_rtol``) and the loss goes down."""
        base = corept_store.base(config_name)
        targets = B.lora_targets(base, corept_store.arch(config_name))
        models = [B.add_lora(corept.patch(copy.deepcopy(base)), patched=True, targets=targets,
                             rank=self.lora_rank, checkpointing=False),
                  B.add_lora(copy.deepcopy(base), patched=False, targets=targets, rank=self.lora_rank,
                             checkpointing=False)]
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=self.convergence_lr)
                for m in models]
        batches = [corept_store.batch(config_name, seed=100 + i) for i in range(4)]
        losses = [[], []]
        for step in range(self.convergence_steps):
            for i, (m, opt) in enumerate(zip(models, opts)):
                res = C.train_pass(m, batches[step % len(batches)])
                losses[i].append(res.loss.item())
                opt.step()
                opt.zero_grad(set_to_none=True)
        got, want = torch.tensor(losses[0]), torch.tensor(losses[1])
        torch.testing.assert_close(got, want, rtol=self.convergence_rtol, atol=0.0,
                                   msg=lambda m: f"per-step losses differ:\n{got.tolist()}\n{want.tolist()}\n{m}")
        assert want[-4:].mean() < want[:4].mean() - 0.05, f"the loss did not go down: {want.tolist()}"
