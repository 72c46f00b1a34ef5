"""``corept export``: write a model (a merged folder, an adapter folder, a hub id or an alias) as GGUF.

An adapter folder (``adapter_config.json``, as ``corept train`` writes to ``OUTPUT/adapter``) is
loaded onto its base model and merged in float32; anything else loads as a plain model. The file
lands in ``--output`` as ``<name>-<QUANT>.gguf``, written atomically like every corept save.
"""
from __future__ import annotations

import json
from pathlib import Path

HELP = "write a model or a trained adapter as one GGUF file for llama.cpp / Ollama / LM Studio (no compiler needed)"

EPILOG = """\
quantizations: f16, bf16, q8_0 (default), q4_k_m, q5_k_m, q6_k (K-quant mixes as llama.cpp chooses them:
see docs/export.md). Run the file with llama.cpp:  llama-cli -m FILE -cnv
or with Ollama:  printf 'FROM FILE\\n' > Modelfile && ollama create my-model -f Modelfile && ollama run my-model

example: corept export my-run/adapter --quantization q4_k_m --output my-run/gguf
"""


def add_arguments(p) -> None:
    from corept.export.gguf.mix import MIXES

    p.add_argument("model", help="adapter folder, merged/transformers folder, HF id or plugin alias")
    p.add_argument("--quantization", "-q", default="q8_0", help=f"one of {', '.join(MIXES)} (default q8_0)")
    p.add_argument("--output", required=True, help="folder the .gguf file is written into")
    p.add_argument("--name", help="file name stem (default: the model's folder or repo name)")


def _adapter_base(folder: Path) -> str | None:
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")


def run(args) -> int:
    import corept
    from corept.errors import InvalidOptionsError
    from corept.export.gguf.writer import normalize_mix
    from corept.saving.save import save_gguf

    mix = normalize_mix(args.quantization)  # a bad name fails before anything loads
    folder = Path(args.model).expanduser()
    is_adapter = folder.is_dir() and (folder / "adapter_config.json").is_file()
    base_name = _adapter_base(folder) if is_adapter else None
    if is_adapter and not base_name:
        raise InvalidOptionsError(f"{folder}/adapter_config.json names no base_model_name_or_path to load it onto")
    model, tokenizer = corept.load(base_name or args.model, patch=False)
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    name = args.name or (folder.resolve().parent.name if is_adapter else folder.resolve().name if folder.is_dir() else None)
    path = save_gguf(model, tokenizer, Path(args.output).expanduser(), mix, name=name)
    print(f"GGUF ({mix}): {path}")
    print(f"  llama.cpp: llama-cli -m {path} -cnv")
    print(f"  Ollama:    printf 'FROM {path}\\n' > Modelfile && ollama create my-model -f Modelfile && ollama run my-model")
    return 0
