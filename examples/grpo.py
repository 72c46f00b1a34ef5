"""Reinforcement learning with GRPO and LoRA: corept.load -> corept.get_peft_model -> TRL GRPOTrainer -> corept.save.

Rows: a prompt and the expected answer (shipped: 64 arithmetic questions, "Answer briefly."). For each
prompt the patched model samples a group of completions with its own generate() (KV cache); two
rewards score them, the right number and brevity (about 6 words), and GRPO moves the adapter toward
the completions that beat their group's mean. SmolLM2-135M rambles and rarely adds right, so its
reward rises mostly on brevity within the few minutes this runs on a CPU. Rewards are plain Python
functions: write your own with the same signature (``completions``, plus any dataset column).
TRL computes the per-token log-probs with its fused LM head (chunks, never the whole batch's logits).

    python examples/grpo.py                          # embedded SmolLM2-135M-Instruct, a few minutes on CPU
    python examples/grpo.py --tiny --max-steps 2     # tiny built-in model (tests)
"""
import argparse
import os

import torch
from trl import GRPOConfig, GRPOTrainer

import corept
from corept.training import default_model, load_training_data, shipped_data
from corept.training.rewards import exact_match, length_reward


def main() -> None:
    p = argparse.ArgumentParser(description="GRPO with LoRA on a corept model")
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--data", help="default: the shipped arithmetic prompts (prompt + answer)")
    p.add_argument("--output", default="outputs/grpo")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--tiny", action="store_true", help="use the tiny built-in model")
    args = p.parse_args()
    if args.tiny:
        os.environ["COREPT_DEMO_MODEL"] = "tiny"
    gpu = torch.cuda.is_available()

    model, tokenizer = corept.load(args.model or default_model()[0], max_seq_length=256)
    model = corept.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing="corept")
    dataset, _ = load_training_data(args.data or shipped_data("grpo"), "grpo")
    brief = length_reward(6)  # 1 at 6 words, less the further from it

    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset, reward_funcs=[exact_match, brief],
        args=GRPOConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=32, learning_rate=2e-4, logging_steps=1,
                        save_strategy="no", report_to="none", use_cpu=not gpu,
                        bf16=gpu and torch.cuda.is_bf16_supported(),
                        gradient_checkpointing=False,  # corept's own checkpointing is already on
                        ddp_find_unused_parameters=False))  # needed by corept's checkpointing under DDP
    trainer.train()
    rewards = [round(e["reward"], 3) for e in trainer.state.log_history if "reward" in e]
    print("reward per step:", " ".join(map(str, rewards)))
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch: rank 0 saves
        print("adapter:", corept.save(model, tokenizer, f"{args.output}/adapter", method="lora"))
        print("merged: ", corept.save(model, tokenizer, f"{args.output}/merged", method="merged_16bit"))
    if torch.distributed.is_initialized():  # the other ranks wait for rank 0's save, then all leave together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
