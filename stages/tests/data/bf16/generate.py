"""Goldens of bf16 mixed precision on the shared fixtures, with torch and transformers.

rudder's `precision = "bf16"` keeps trained weights, gradients and AdamW's moments in fp32 and
runs the forward pass on a bf16 copy of the weights, activations in bf16, the log-softmax and
loss in fp32 (apex's O2 / Megatron's bf16 scheme; a model loaded in bf16 behaves the same way
at inference). This script runs that scheme with transformers' Llama (sdpa attention):

  forward      the per-position log-prob of the next token of the logits fixtures' sequences
               0-2 under ../../../../shared/fixtures/policy, in bf16 (sdpa attention, and
               eager: two implementations of bf16, to measure how far they differ) and in fp32
  sft          8 steps of the SFT fixture (batch 16 = the whole dataset, completion-only NLL,
               constant lr 1e-3, AdamW (0.9, 0.999, 1e-8), no clipping): each step copies the
               fp32 master weights to a bf16 model, runs forward and backward there, and steps
               AdamW on the master weights with the bf16 gradients cast to fp32; per step the
               loss and the global gradient norm, and the same run in fp32

Writes golden.json beside this script.
Run: /path/to/python stages/tests/data/bf16/generate.py   (torch, transformers, safetensors)
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[4] / "shared" / "fixtures"
STEPS = 8

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def load(dtype, attention="sdpa"):
    return AutoModelForCausalLM.from_pretrained(
        FIXTURES / "policy", dtype=dtype, attn_implementation=attention
    )


def next_token_logps(model, ids):
    with torch.no_grad():
        logits = model(ids).logits.float()
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].tolist()


def forward_goldens():
    fixture = load_file(FIXTURES / "logits.safetensors")
    bf16, fp32 = load(torch.bfloat16), load(torch.float32)
    eager = load(torch.bfloat16, "eager")
    out = []
    for i in range(3):
        ids = fixture[f"input_ids_{i}"]
        out.append(
            {
                "input_ids": ids[0].tolist(),
                "bf16": next_token_logps(bf16, ids),
                "bf16_eager": next_token_logps(eager, ids),
                "fp32": next_token_logps(fp32, ids),
            }
        )
    return out


def sft_batch():
    rows = json.loads((FIXTURES / "sft_trajectory.json").read_text())["rows"]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids, labels, mask


def sft_loss(model, ids, labels, mask):
    logits = model(ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    picked = target != -100
    nll = -logp.gather(2, target.clamp(min=0)[..., None])[..., 0]
    return (nll * picked).sum() / picked.sum()


def sft_trajectory(dtype):
    ids, labels, mask = sft_batch()
    master = load(torch.float32)
    work = load(dtype)
    params = dict(master.named_parameters())
    optim = torch.optim.AdamW(
        params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    steps = []
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for name, p in work.named_parameters():
                p.copy_(params[name].to(dtype))
        work.zero_grad(set_to_none=True)
        loss = sft_loss(work, ids, labels, mask)
        loss.backward()
        for name, p in work.named_parameters():
            params[name].grad = p.grad.float()
        norm = torch.sqrt(sum(g.grad.double().pow(2).sum() for g in params.values()))
        steps.append({"step": step, "loss": loss.item(), "grad_norm": norm.item()})
        optim.step()
        optim.zero_grad(set_to_none=True)
    return steps


def main():
    golden = {
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "attention": "sdpa",
        "forward": forward_goldens(),
        "sft": {"bf16": sft_trajectory(torch.bfloat16), "fp32": sft_trajectory(torch.float32)},
    }
    (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    main()
