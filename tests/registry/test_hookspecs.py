"""corept.hookspecs, and meta-tests: every hook is documented in docs/hooks.md and exercised by a test."""
from __future__ import annotations

import copy
import inspect
import re
import types
from pathlib import Path

import pluggy
import pytest
import torch

import corept
from corept.registry import hookspecs
from corept.testing import live
from corept.registry.declarations import COMPONENT_ROLES, COMPONENTS
import tiny

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "hooks.md"
TESTS = Path(__file__).resolve().parents[1]
FIRSTRESULT_SENTENCE = "Stops at the first non-None result."


def _specs() -> dict:
    """name -> (function, hookspec options) for every hook spec in corept.hookspecs."""
    out = {}
    for name, fn in vars(hookspecs).items():
        opts = getattr(fn, f"{hookspecs.PROJECT}_spec", None)
        if opts is not None:
            out[name] = (fn, opts)
    return out


def _ann(annotation) -> str:
    return str(annotation).strip("'\"")


def _signature(name: str, fn) -> str:
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {_ann(p.annotation)}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {_ann(sig.return_annotation)}"


def _sections() -> dict[str, str]:
    text = DOC.read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.split("\n", 1)[0].strip(): part for part in parts[1:]}


def _python_blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


# -- the specs themselves ----------------------------------------------------------------------
def test_the_hook_set():
    specs = _specs()
    assert set(specs) == {"corept_register_architectures", *hookspecs.COMPONENT_HOOKS.values(), "corept_patch_lora"}
    assert set(specs) == set(hookspecs.ALL_HOOKS)
    assert set(hookspecs.COMPONENT_HOOKS) == set(COMPONENTS) == set(COMPONENT_ROLES)
    assert not specs["corept_register_architectures"][1]["firstresult"]
    for name in hookspecs.COMPONENT_HOOKS.values():
        assert specs[name][1]["firstresult"], name


def test_specs_are_typed_and_documented():
    for name, (fn, opts) in _specs().items():
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        doc = inspect.getdoc(fn)
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) is untyped"
            assert f":param {p.name}:" in doc, f"{name}: no :param {p.name}: in its docstring"
        assert ":return:" in doc, name
        assert (FIRSTRESULT_SENTENCE in doc) == bool(opts["firstresult"]), name


def test_hookimpl_is_reexported_for_plugins():
    assert corept.hookimpl is hookspecs.hookimpl
    assert isinstance(corept.hookimpl, pluggy.HookimplMarker) and corept.hookimpl.project_name == "corept"


# -- meta-tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_is_documented(name):
    sections = _sections()
    assert name in sections, f"docs/hooks.md has no '## {name}' section"
    section = sections[name]
    fn, opts = _specs()[name]
    flat = " ".join(section.split())
    assert _signature(name, fn) in flat, f"docs/hooks.md: {name}: signature must read `{_signature(name, fn)}`"
    assert "**When it is called:**" in section and "**Return:**" in section, name
    assert ("**firstresult:** yes" in section) == bool(opts["firstresult"]), name
    assert ("**firstresult:** no" in section) == (not opts["firstresult"]), name
    examples = [b for b in _python_blocks(section) if f"def {name}(" in b and "@corept.hookimpl" in b]
    assert len(examples) == 1, f"{name}: needs one example implementation (a python block with @corept.hookimpl)"
    if opts["firstresult"]:
        assert "Replacement" in section and "None" in section


def test_docs_document_no_hook_that_does_not_exist():
    documented = {title for title in _sections() if title.startswith("corept_")}
    assert documented == set(_specs())


def test_doc_documents_every_replacement_field():
    text = DOC.read_text()
    for field in corept.Replacement.__dataclass_fields__:
        assert f"`{field}`" in text or f"    {field}:" in text, field


@pytest.mark.parametrize("name", sorted(_specs()))
def test_every_hook_is_exercised_by_a_test(name):
    users = [p.name for p in sorted(TESTS.rglob("test_*.py")) if p.name != Path(__file__).name
             and re.search(rf"\b{name}\b", p.read_text())]
    assert users, f"no test module (besides {Path(__file__).name}) exercises {name}"


# -- the documented examples work ---------------------------------------------------------------
def _example_module(name: str) -> types.ModuleType:
    (block,) = [b for b in _python_blocks(_sections()[name]) if f"def {name}(" in b and "@corept.hookimpl" in b]
    module = types.ModuleType(f"example_{name}")
    exec(compile(block, f"docs/hooks.md#{name}", "exec"), module.__dict__)
    return module


def test_example_register_architectures():
    module = _example_module("corept_register_architectures")
    corept.register_plugin(module, "doc-example-register")
    try:
        arch, rec = corept.get_plugin_manager().architecture_for("myarch")
        assert rec.name == "doc-example-register" and arch.numerics.norm_offset == 1.0
        assert corept.get_plugin_manager().alias_target("myarch-1b")[0] == "acme/MyArch-1B"
    finally:
        corept.unregister_plugin("doc-example-register")


# hook -> (component to patch, implementation the report must show for a tiny llama)
EXAMPLE_EXPECTATIONS = {
    "corept_patch_attention": ("attention", "acme:attention-tag x2"),
    "corept_patch_mlp": ("mlp", "triton:swiglu x2"),  # the example declines llama: the built-in answers
    "corept_patch_rope": ("rope", "acme:rope x2"),
    "corept_patch_norm": ("norm", "acme:rms_norm x5"),
    "corept_patch_loss": ("loss", "acme:causal-lm x1"),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_EXPECTATIONS))
def test_component_examples_patch_a_model_correctly(name):
    component, implementation = EXAMPLE_EXPECTATIONS[name]
    module = _example_module(name)
    model = tiny.tiny_model("llama")
    ref = copy.deepcopy(model)
    corept.register_plugin(module, f"doc-example-{component}")
    try:
        corept.patch(model, only=[component])
    finally:
        corept.unregister_plugin(f"doc-example-{component}")
    assert corept.report(model).applied == {component: implementation}
    live.check_report(model)
    live.check_signatures(model)
    ids, _ = tiny.batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)


def test_lora_example_keeps_peft_for_one_module_kind():
    module = _example_module("corept_patch_lora")
    corept.register_plugin(module, "doc-example-lora")
    try:
        model = corept.get_peft_model(corept.patch(tiny.tiny_model("llama"), only=["norm"]), r=4,
                                      use_gradient_checkpointing=False)
    finally:
        corept.unregister_plugin("doc-example-lora")
    rep = corept.report(model)
    assert rep.applied["lora"] == "triton:lora_mlp x2", rep.applied
    assert rep.fallbacks["lora"] == "2 modules: acme keeps peft's attention LoRA"
    live.check_report(model)
