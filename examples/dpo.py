"""Preference tuning with DPO and LoRA: corept.load -> corept.get_peft_model -> TRL DPOTrainer -> corept.save.

Rows: prompt, chosen, rejected. The reference model is the policy with its adapter disabled
(``ref_model=None`` with a peft model), so no second copy of the weights is loaded. TRL computes
the policy and reference log-probs with its fused LM head: per-token log-probs in chunks, never
the full-vocabulary logits of the whole batch.

    python examples/dpo.py --max-steps 20            # embedded SmolLM2-135M-Instruct, shipped data
    python examples/dpo.py --tiny --max-steps 2      # tiny built-in model (tests)
"""
import argparse
import os

import torch
from trl import DPOConfig, DPOTrainer

import corept
from corept.training import default_model, load_training_data, shipped_data
from corept.training.trainers import use_disabled_adapter_reference


def main() -> None:
    p = argparse.ArgumentParser(description="DPO with LoRA on a corept model")
    p.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--data", help="default: the shipped corept preference pairs")
    p.add_argument("--output", default="outputs/dpo")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="use the tiny built-in model")
    args = p.parse_args()
    if args.tiny:
        os.environ["COREPT_DEMO_MODEL"] = "tiny"
    gpu = torch.cuda.is_available()

    model, tokenizer = corept.load(args.model or default_model()[0], max_seq_length=256)
    model = corept.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing="corept")
    dataset, _ = load_training_data(args.data or shipped_data("dpo"), "dpo")

    trainer = DPOTrainer(
        model=model, ref_model=None, processing_class=tokenizer, train_dataset=dataset,
        args=DPOConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=4,
                       learning_rate=2e-4, beta=0.1, logging_steps=5, max_length=256, save_strategy="no",
                       report_to="none", use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(),
                       gradient_checkpointing=False,
                       ddp_find_unused_parameters=False))  # needed by corept's checkpointing under DDP
    use_disabled_adapter_reference(model)  # TRL copied the fresh adapter as "ref": use it disabled instead
    trainer.train()
    if trainer.is_world_process_zero():  # under torchrun / accelerate launch: rank 0 saves
        print("adapter:", corept.save(model, tokenizer, f"{args.output}/adapter", method="lora"))
        print("merged: ", corept.save(model, tokenizer, f"{args.output}/merged", method="merged_16bit"))
    if torch.distributed.is_initialized():  # the other ranks wait for rank 0's save, then all leave together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
