"""The README's support matrix (architecture x component x quirks), generated from the plugins'
declarations, never written by hand.

``corept support-matrix`` prints it; ``--write README.md`` replaces the block between
:data:`START` and :data:`END`; ``--check README.md`` exits 1 when that block is stale
(tests/testing/test_support_matrix.py does the same check).

What each cell says is derived from the declaration alone (no model is built): a declared
component names the shared kernel its quirks select; an undeclared one stays transformers'. The
attention cell says which ``AttentionInterface`` implementation runs, since the built-in
:class:`~corept.ArchitecturePlugin` answers no attention hook (corept ships no attention kernel).
"""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from corept.registry.declarations import COMPONENTS, Architecture, Projections
from corept.registry.hookspecs import COMPONENT_HOOKS
from corept.registry.manager import get_plugin_manager
from corept.registry.quirks import FromConfig, LoadPolicy, Numerics, Recorded
from corept.registry.plugin_base import ArchitecturePlugin

START = "<!-- support-matrix:start -->"
END = "<!-- support-matrix:end -->"
_DEFAULTS = (LoadPolicy(), Numerics(), Recorded())


def _own_hook(plugin, component: str) -> bool:
    """The plugin object implements the component's hook itself (not only declarations)."""
    name = COMPONENT_HOOKS[component]
    impl = getattr(type(plugin), name, None) or getattr(plugin, name, None)
    return impl is not None and impl is not getattr(ArchitecturePlugin, name, None)


def _supports_sdpa(model_type: str) -> bool:
    """transformers' causal-LM class for ``model_type`` runs SDPA (its default) rather than eager."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    return bool(getattr(cls, "_supports_sdpa", True))


def component_cell(arch: Architecture, component: str, plugin=None) -> str:
    """What runs for ``component`` of ``arch``: a kernel name, an HF implementation, or a plugin hook."""
    if component in arch.keep:
        return "transformers"
    if component == "experts" and not arch.roles.experts:
        return "-"
    if plugin is not None and _own_hook(plugin, component):
        return "plugin hook"
    n = arch.numerics
    if component == "attention":
        forced = arch.load.forced_attn_implementation
        implementation = forced or ("sdpa" if _supports_sdpa(arch.model_type) else "eager")
        hf = f"HF {implementation}{' (forced)' if forced else ''}"
        if implementation == "eager":  # corept's varlen kernel takes eager's packed and unpadded calls
            return f"varlen_attention; {hf} when padded"
        return f"{hf}; varlen_attention when packed"
    if component == "norm":
        offset = f", {n.norm_offset:g}+w" if isinstance(n.norm_offset, (int, float)) and n.norm_offset else ""
        return f"rms_norm ({n.norm_casting}{offset})"
    if component == "mlp":
        act = n.mlp_activation
        act = "activation from config" if isinstance(act, FromConfig) else act
        fused = ", fused gate_up" if arch.projections.gate_up else ""
        return f"glu ({act}{fused})"
    if component == "rope":
        return "rope"
    if component == "experts":
        return "expert_linear (grouped GEMM)"
    extras = [x for x, on in (("scale", n.logit_scale != 1.0), ("softcap", n.final_logit_softcap is not None)) if on]
    return "fused_linear_cross_entropy" + "".join(f" + {x}" for x in extras)


def _fmt(value) -> str:
    if isinstance(value, FromConfig):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def quirks_cell(arch: Architecture) -> str:
    """The quirks that differ from the defaults, ``name=value``, ``; ``-separated."""
    parts = []
    for group, default in zip((arch.load, arch.numerics, arch.recorded), _DEFAULTS):
        for f in fields(group):
            value = getattr(group, f.name)
            if f.name == "config":
                parts += [f"{k} (recorded)" for k in value]
            elif value != getattr(default, f.name) and not (isinstance(value, FromConfig)
                                                             and value == getattr(default, f.name)):
                parts.append(f"{f.name}={_fmt(value)}")
    if arch.projections != Projections():
        parts.append("fused projections")
    if arch.notes:
        parts.append(f"note: {arch.notes}")
    return "; ".join(parts) or "-"


def rows() -> list[tuple[str, str, Architecture, object]]:
    """``(model_type, plugin name, declaration, plugin object)`` for every loaded plugin, sorted."""
    out = [(arch.model_type, rec.name, arch, rec.plugin) for arch, rec in get_plugin_manager().declarations()]
    return sorted(out, key=lambda r: (r[1], r[0]))


def render() -> str:
    """The markdown table (no markers)."""
    head = ["architecture", "plugin", *COMPONENTS, "transformers", "quirks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model_type, plugin_name, arch, plugin in rows():
        cells = [f"`{model_type}`", plugin_name, *(component_cell(arch, c, plugin) for c in COMPONENTS),
                 f"`{arch.transformers}`", quirks_cell(arch).replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    legend = ("Generated by `corept support-matrix --write README.md` from the installed plugins' "
              "declarations. Kernel names are `corept_kernels` functions (Triton on CUDA or under "
              "`TRITON_INTERPRET=1`, else their torch twins, as `corept.report(model)` says); each is installed "
              "only once its probe reproduces the module's forward. LoRA layers additionally get `lora_mlp` / "
              "`lora_qkv` / `lora_o` through `corept.get_peft_model`.")
    return legend + "\n\n" + "\n".join(lines)


def block() -> str:
    return f"{START}\n{render()}\n{END}"


_BLOCK_RE = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)


def current_block(readme: str | Path) -> str | None:
    """The marked block now in ``readme``, or ``None`` if it has no markers."""
    m = _BLOCK_RE.search(Path(readme).read_text(encoding="utf-8"))
    return m.group(0) if m else None


def write(readme: str | Path) -> bool:
    """Replace the marked block in ``readme``; returns whether the file changed."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    if not _BLOCK_RE.search(text):
        raise ValueError(f"{path} has no {START} ... {END} markers")
    new = _BLOCK_RE.sub(lambda _: block(), text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text
