"""Goldens of LoRA training runs with PEFT 0.21 + TRL 1.16 on the shared fixtures.

Writes, beside this script:
  sft_init/    the initial adapter PEFT draws (all-linear, r 4, alpha 8) on ../../../../shared/fixtures/policy
  dpo_init/    the initial adapter for DPO (q_proj, v_proj; r 4, alpha 16, rsLoRA)
  sft_lora_trajectory.json, dpo_lora_trajectory.json
               per step (loss, grad_norm, metrics) of 20 steps of SFTTrainer / DPOTrainer from that
               adapter, with the per-tensor (L2, sum) of the trained adapter weights.

The settings are those of the full-parameter fixtures (CONVENTIONS.md there): batch 16 = the
whole dataset in file order, constant lr 1e-3, AdamW (0.9, 0.999, 1e-8), no weight decay, no
clipping (max_grad_norm is huge so that the Trainer reports the norm and never scales), fp32, one
thread. DPO: sigmoid, beta 0.1, the reference is the policy with its adapters disabled (TRL's
behaviour for a PEFT model without ref_model).

Run: /path/to/python stages/tests/data/lora/generate.py   (torch, transformers, trl, peft)
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[4] / "shared" / "fixtures"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


class Record(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.steps.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})


def summary(tensors):
    return {
        name: {"l2": t.double().norm().item(), "sum": t.double().sum().item()}
        for name, t in sorted(tensors.items())
    }


def common(out):
    return dict(
        output_dir=out,
        per_device_train_batch_size=16,
        max_steps=20,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1e9,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        dataloader_drop_last=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=0,
        gradient_checkpointing=False,
    )


def initial_adapter(name, config, seed):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "policy", attn_implementation="eager")
    model = get_peft_model(base, config)
    model.save_pretrained(HERE / name)
    # Keep the committed files free of this machine's paths and of PEFT's model card.
    (HERE / name / "README.md").unlink(missing_ok=True)
    config_path = HERE / name / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = None
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return HERE / name


def load(adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "policy", attn_implementation="eager")
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def trained_adapter(model, out):
    model.save_pretrained(out)
    return summary(load_file(os.path.join(out, "adapter_model.safetensors")))


def sft(tokenizer):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    adapter_dir = initial_adapter("sft_init", config, 0)
    model = load(adapter_dir)
    data = load_dataset("json", data_files=str(FIXTURES / "sft.jsonl"), split="train")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**common(out), completion_only_loss=True, max_length=1024, packing=False)
        record = Record()
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[record]
        )
        trainer.train()
        final = trained_adapter(model, os.path.join(out, "final"))
    return {"steps": record.steps, "final_adapter_summary": final}


def dpo(tokenizer):
    config = LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True
    )
    adapter_dir = initial_adapter("dpo_init", config, 1)
    model = load(adapter_dir)
    data = load_dataset("json", data_files=str(FIXTURES / "prefs.jsonl"), split="train")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**common(out), beta=0.1, loss_type=["sigmoid"], max_length=1024)
        record = Record()
        trainer = DPOTrainer(
            model=model, ref_model=None, args=args, train_dataset=data, processing_class=tokenizer,
            callbacks=[record],
        )
        trainer.train()
        final = trained_adapter(model, os.path.join(out, "final"))
    return {"steps": record.steps, "final_adapter_summary": final}


def main():
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    which = sys.argv[1:] or ["sft", "dpo"]
    for name in which:
        result = {"sft": sft, "dpo": dpo}[name](tokenizer)
        import peft, transformers, trl

        result["versions"] = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        }
        path = HERE / f"{name}_lora_trajectory.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}: {len(result['steps'])} steps, loss {result['steps'][0]['loss']:.6f} -> {result['steps'][-1]['loss']:.6f}")


if __name__ == "__main__":
    main()
