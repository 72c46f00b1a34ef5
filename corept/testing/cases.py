"""The test matrix: dtype x patch set x LoRA x checkpointing x quantization, pruned.

Full matrix (a suite's ``full_matrix`` configs; by default its first config):

* dtype {fp32, bf16} x patch set {each component alone, all}, no LoRA, no checkpointing, no
  quantization: 12 cases (14 with experts, for an architecture that declares them). A component alone isolates its kernel; ``attention`` alone (which the
  built-in plugins leave on transformers' AttentionInterface) must then be bitwise the reference.
* fp32, all, LoRA, checkpointing {off, on}; fp32, all, full fine-tuning with checkpointing;
  bf16, all, LoRA: 4 cases.
* 4-bit NF4 (only with LoRA: a quantized base cannot be trained directly): fp32 with
  checkpointing {off, on}, bf16 without: 3 cases.

Pruned, because they cannot differ from a case above: a single component with LoRA, checkpointing
or 4-bit (the fused LoRA forwards, the recompute and the dequantization wrap whichever component
forwards are installed, and ``all`` installs every one of them); 4-bit without LoRA; bf16 with
checkpointing (the recompute replays the same kernels in the same dtype as the fp32 case).

Other configs (quirk variants) get the cases that exercise their quirk end to end: fp32 all,
bf16 all, fp32 all with LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

from corept.registry.declarations import COMPONENTS

ALL = "all"
PATCH_SETS = COMPONENTS + (ALL,)


@dataclass(frozen=True)
class MatrixCase:
    """One cell of the matrix.

    :param config: the suite's config name. :param dtype: ``"fp32"`` or ``"bf16"``.
    :param patch: a component name (``corept.patch(only=[c])``) or ``"all"``.
    :param lora: LoRA adapters (``corept.get_peft_model`` vs plain peft).
    :param ckpt: gradient checkpointing (corept's vs transformers').
    :param quant: ``"none"`` or ``"4bit"`` (NF4, double quant, bitsandbytes).
    """

    config: str
    dtype: str = "fp32"
    patch: str = ALL
    lora: bool = False
    ckpt: bool = False
    quant: str = "none"

    @property
    def only(self) -> list[str] | None:
        return None if self.patch == ALL else [self.patch]

    @property
    def id(self) -> str:
        parts = [self.config, self.dtype, self.patch]
        if self.lora:
            parts.append("lora")
        if self.ckpt:
            parts.append("ckpt")
        if self.quant != "none":
            parts.append(self.quant)
        return "-".join(parts)


def full_cases(config: str, experts: bool = False) -> list[MatrixCase]:
    """Every case of the full matrix for ``config`` (see the module docstring); ``experts``: the
    architecture declares an experts class, so ``experts`` alone is a patch set too (2 more cases)."""
    sets = [p for p in PATCH_SETS if experts or p != "experts"]
    cases = [MatrixCase(config, dtype, patch) for dtype in ("fp32", "bf16") for patch in sets]
    cases += [MatrixCase(config, "fp32", ALL, lora=True), MatrixCase(config, "fp32", ALL, lora=True, ckpt=True),
              MatrixCase(config, "fp32", ALL, ckpt=True), MatrixCase(config, "bf16", ALL, lora=True)]
    cases += [MatrixCase(config, "fp32", ALL, lora=True, quant="4bit"),
              MatrixCase(config, "fp32", ALL, lora=True, ckpt=True, quant="4bit"),
              MatrixCase(config, "bf16", ALL, lora=True, quant="4bit")]
    return cases


def quirk_cases(config: str) -> list[MatrixCase]:
    """The reduced set for quirk-variant configs."""
    return [MatrixCase(config, "fp32", ALL), MatrixCase(config, "bf16", ALL), MatrixCase(config, "fp32", ALL, lora=True)]
