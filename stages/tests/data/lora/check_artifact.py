"""Loads a LoRA stage's artifact with PEFT: its `adapter/` over the base, against its merged model.

A LoRA stage's artifact holds the merged model and, in `adapter/`, the PEFT adapter over the base
its `adapter_config.json` names by key (for a stage continuing an incoming adapter, the model
the first stage of the chain started from). This script applies the adapter to BASE with
`PeftModel.from_pretrained`, runs a few token sequences through it and through the merged model
with transformers, and prints the largest absolute difference of the logits (exit 1 above 1e-4,
or when the adapter changes nothing).

Run: /path/to/python stages/tests/data/lora/check_artifact.py BASE_DIR ARTIFACT_DIR
     (torch, transformers, peft; ARTIFACT_DIR from `rudder show RECIPE STAGE --path`)
"""

import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)


def main():
    base_dir, artifact = Path(sys.argv[1]), Path(sys.argv[2])
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    merged = load(artifact)
    plain = load(base_dir)
    adapted = PeftModel.from_pretrained(load(base_dir), artifact / "adapter").eval()
    vocab = merged.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    worst, effect = 0.0, 0.0
    with torch.no_grad():
        for length in (5, 17, 32):
            ids = torch.randint(1, vocab, (1, length), generator=gen)
            ours = merged(input_ids=ids).logits
            worst = max(worst, (adapted(input_ids=ids).logits - ours).abs().max().item())
            effect = max(effect, (plain(input_ids=ids).logits - ours).abs().max().item())
    print(f"PEFT (base + adapter) vs merged artifact: max abs difference {worst:.2e}; "
          f"adapter's effect on the logits {effect:.2e}")
    sys.exit(0 if worst < 1e-4 and effect > 1e-3 else 1)


if __name__ == "__main__":
    main()
