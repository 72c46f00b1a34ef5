"""``corept train``: fine-tune with SFT, DPO, KTO or GRPO (TRL) on a corept-patched model, then save it.

With no ``--model``/``--data`` it runs the embedded default offline (SmolLM2-135M-Instruct, or a
tiny built-in model, on the shipped corept Q/A data) and shows a held-out answer before and after.
"""
from __future__ import annotations

import argparse

HELP = ("fine-tune with TRL (sft/dpo/kto/grpo; LoRA, QLoRA or full) and save adapter + merged model; "
        "no arguments: the embedded offline demo")

#: printed after the options by ``corept train --help``
EPILOG = """\
data (--data: .jsonl, .json, .csv, .parquet or a datasets folder; every row in the format of row 0):
  sft, one of
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
    {"prompt": "Q: 2+2?\\nA:", "completion": " 4"}
    {"text": "Any plain text to continue."}
    (messages/prompt rows use the tokenizer's chat template; prompt+completion puts the loss on the completion)
  dpo  {"prompt": "...", "chosen": "...", "rejected": "..."}   (strings, or conversations as above)
  kto  {"prompt": "...", "completion": "...", "label": true}   (label: true = desirable)
  grpo {"prompt": "What is 2+3?", "answer": "5"}   (prompt: string or conversation; other columns reach the rewards)

rewards (grpo, --reward NAME[=ARG], repeatable; summed): exact_match (1 when the completion's answer, inside
<answer></answer> or its last line, equals the 'answer' column; numbers compared as numbers), format[=REGEX]
(1 when the whole completion matches; default <think>..</think><answer>..</answer>), length[=N] (near N
words). Default: exact_match when the data has an 'answer' column, else format. --num-generations
completions per prompt (default 4) of at most --max-completion-length tokens (default 128), sampled by the
patched model's generate(); --batch-size x --grad-accum must be a multiple of --num-generations.

chat templates and loss (--template, --train-on):
  --template NAME supplies a chat template when the tokenizer has none, or replaces its own (saved with the
  model): {templates}, or the path of a .jinja file.
  --train-on responses (sft default for conversations) puts the loss on the assistant turns only, their
  end-of-turn token included, with any template: system, user and tool turns and role headers get none.
  --train-on all trains on every token. (prompt/completion strings: responses = the completion; text: all)

packing (sft, on by default): rows are packed without padding into bins of --max-seq-length tokens
(--batch-size bins a step); each document keeps its own positions, attention and loss. --no-packing
pads each batch to its longest row instead.

outputs (--output DIR): DIR/adapter (LoRA weights), DIR/merged (transformers folder, unless
--save-method lora), DIR/gguf (with --save-gguf) and DIR/run.json (options, losses, timings).
The no-argument run writes to ~/.cache/corept/runs/demo-sft (COREPT_CACHE moves it).

example: corept train --model ./my-model --data my.jsonl --output my-run --max-steps 20
"""


def _with_template_names(text: str) -> str:
    from corept.training.chat_templates import template_names  # the shipped .jinja files, read as data

    return text.replace("{templates}", ", ".join(template_names()))


EPILOG = _with_template_names(EPILOG)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from corept.training.chat_templates import template_names
    from corept.training.profiles import PROFILES, profile_names
    from corept.training.responses_only import TRAIN_ON

    presets = "; ".join(f"{n}: {v.description}, seq {v.max_seq_length}, batch {v.batch_size} x accum "
                        f"{v.grad_accum}, r {v.r}" for n, v in PROFILES.items())
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="model folder, HF id or plugin alias (default: the embedded model a plugin declares)")
    g.add_argument("--data", help="jsonl, json, csv or parquet file, or a datasets folder (save_to_disk); "
                                  "default: the shipped corept Q/A data")
    g.add_argument("--method", choices=("sft", "dpo", "kto", "grpo"), default="sft",
                   help="TRL trainer: sft (default), dpo, kto or grpo; the data columns each needs are listed below")
    g.add_argument("--output", help="output folder: adapter/, merged/ and run.json (required with --model/--data)")
    g.add_argument("--template", metavar="NAME",
                   help=f"chat template for conversations, replacing the tokenizer's own: {', '.join(template_names())}"
                        f" or a .jinja file (required when the tokenizer has none)")
    g.add_argument("--train-on", choices=TRAIN_ON,
                   help="sft loss on: responses (assistant turns, their end-of-turn token included; the default "
                        "for conversations and prompt/completion) or all (every token; the default for text)")
    g.add_argument("--overwrite", action="store_true", help="allow a non-empty --output (the no-argument run too)")
    q = p.add_argument_group("weights")
    q.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (bitsandbytes)")
    q.add_argument("--load-in-8bit", action="store_true", help="LLM.int8 base weights (bitsandbytes)")
    q.add_argument("--full-finetuning", action="store_true", help="train every weight (no adapters)")
    q.add_argument("--r", type=int, help="LoRA rank (default 16, or the --profile's)")
    q.add_argument("--alpha", type=float, dest="lora_alpha",
                   help="LoRA alpha (default: = r; the no-argument demo uses 32 with r 16)")
    q.add_argument("--targets", default="all-linear",
                   help="LoRA target modules: all-linear or comma-separated names (q_proj,v_proj)")
    s = p.add_argument_group("sizes and schedule")
    s.add_argument("--profile", choices=profile_names(),
                   help=f"preset sizes (explicit flags win): {presets}; auto: ask the VRAM planner. Default: "
                        f"none, i.e. seq 1024, batch 2 x accum 1, r 16 unless flags say otherwise")
    s.add_argument("--max-seq-length", type=int, help="tokens per row; longer rows are truncated (default 1024)")
    s.add_argument("--batch-size", type=int, help="per-device micro-batch (default 2)")
    s.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    s.add_argument("--lr", type=float, help="learning rate (default per method: sft 2e-4, dpo/kto/grpo 5e-5; "
                                            "full fine-tuning 2e-5 / 1e-6)")
    s.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    s.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    s.add_argument("--optim", help="HF optimizer name (default adamw_8bit on GPU, adamw_torch on CPU)")
    s.add_argument("--gradient-checkpointing", default=None, choices=("auto", "corept", "true", "false"),
                   help="auto (default: keep activations when they fit the GPU, else corept), corept (offloaded "
                        "recompute, the least memory), true (standard) or false")
    s.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="sft: pack rows padding-free into bins of --max-seq-length tokens (--batch-size bins a "
                        "step); documents stay apart in attention, RoPE and loss. On by default for sft; "
                        "--no-packing pads each batch to its longest row")
    s.add_argument("--beta", type=float, help="DPO/KTO beta (default 0.1); GRPO's KL coefficient (default 0: no "
                                             "reference pass)")
    s.add_argument("--reward", action="append", dest="rewards", metavar="NAME[=ARG]",
                   help="grpo reward, repeatable: exact_match, format[=REGEX], length[=N] (see below)")
    s.add_argument("--num-generations", type=int, help="grpo: completions sampled per prompt (default 4)")
    s.add_argument("--max-completion-length", type=int, help="grpo: tokens per completion (default 128)")
    s.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="under torchrun / accelerate launch: ddp (a replica per GPU; the default when launched "
                        "with >1 process) or fsdp (FSDP2 shards, CUDA only); see docs/distributed.md")
    s.add_argument("--seed", type=int, default=3407, help="seed of the adapters' init and the data order (default 3407)")
    o = p.add_argument_group("output")
    o.add_argument("--save-method", choices=("lora", "merged_16bit", "merged_4bit"), default=None,
                   help="lora: adapter only; merged_16bit (default) / merged_4bit: adapter + merged model")
    o.add_argument("--save-gguf", metavar="QUANT",
                   help="also write DIR/gguf/<name>-<QUANT>.gguf for llama.cpp / Ollama: f16, bf16, q8_0, q4_k_m, "
                        "q5_k_m or q6_k (merged in fp32; the tokenizer and chat template inside)")
    o.add_argument("--sample-prompt", help="prompt for the closing sample generation (default: row 0's prompt)")
    o.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest closing sample answer, in tokens; generation stops earlier at EOS (default 48; "
                        "96 in the no-argument run)")


_SIZES = ("r", "lora_alpha", "max_seq_length", "batch_size", "grad_accum", "lr", "epochs", "max_steps", "optim",
          "gradient_checkpointing", "save_method", "save_gguf", "sample_prompt")
_FLAGS = ("load_in_4bit", "load_in_8bit", "full_finetuning", "profile", "overwrite", "distributed")
_WHEN_GIVEN = ("template", "train_on", "rewards", "num_generations", "max_completion_length")  # passed on when given


def options_from_args(args):
    """The :class:`~corept.training.options.TrainOptions` of parsed ``corept train`` arguments."""
    import os

    from corept.training.defaults import embedded_options
    from corept.training.options import TrainOptions

    if getattr(args, "distributed", None) is None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        args.distributed = "fsdp"  # `accelerate launch` with an FSDP config file

    given = {k: getattr(args, k) for k in _SIZES if getattr(args, k, None) is not None}
    given.update({k: getattr(args, k) for k in _FLAGS if getattr(args, k, None)})
    if getattr(args, "packing", None) is not None:
        given["packing"] = args.packing
    given.update({k: getattr(args, k) for k in _WHEN_GIVEN if getattr(args, k, None) is not None})
    common = dict(targets=args.targets, beta=args.beta, seed=args.seed)
    if args.max_new_tokens is not None:
        common["max_new_tokens"] = args.max_new_tokens
    if args.model is None and args.data is None:
        return embedded_options(args.method, output=args.output, **common, **given)
    if args.data is None or args.model is None:
        from corept.training.defaults import default_model, shipped_data

        data = args.data or str(shipped_data(args.method))
        model = args.model or default_model()[0]
    else:
        data, model = args.data, args.model
    sharded_lora = getattr(args, "distributed", None) == "fsdp" and not args.full_finetuning
    given.setdefault("save_method", "lora" if sharded_lora else "merged_16bit")
    given.setdefault("gradient_checkpointing", "auto")
    return TrainOptions(model=model, data=data, method=args.method, output=args.output, **common, **given)


def run(args) -> int:
    from corept.training.cuda_memory import prefer_expandable_segments
    from corept.training.run import run_training

    prefer_expandable_segments()

    result = run_training(options_from_args(args))
    if result.interrupted_at is not None:
        return 130
    return 0 if result.greedy is None or result.greedy.equal else 1
