"""Loads the adapter rudder trained in `lora_trajectories.rs` with PEFT and compares logits.

`cargo test -p rudder-stages --test lora_trajectories` leaves the trained SFT adapter and
rudder's logits of four sequences in target/tmp/lora-peft-check/; this script loads the
fixture policy, applies the adapter with `PeftModel.from_pretrained`, and prints the largest
absolute difference of the logits (exit 1 above 1e-4).

Run: /path/to/python stages/tests/data/lora/check_peft.py [DIR]   (torch, transformers, peft)
"""

import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[4] / "shared" / "fixtures"
DEFAULT = HERE.parents[3] / "target" / "tmp" / "lora-peft-check"

torch.set_num_threads(1)


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "policy", attn_implementation="eager")
    model = PeftModel.from_pretrained(base, folder).eval()
    ours = load_file(folder / "rudder_logits.safetensors")
    worst = 0.0
    with torch.no_grad():
        for i in range(len(ours) // 2):
            logits = model(input_ids=ours[f"input_ids_{i}"]).logits
            worst = max(worst, (logits - ours[f"logits_{i}"]).abs().max().item())
            # The adapter must matter, or the comparison says nothing.
            plain = base.__class__.from_pretrained(FIXTURES / "policy", attn_implementation="eager")
            effect = (plain(input_ids=ours[f"input_ids_{i}"]).logits - logits).abs().max().item()
            assert effect > 1e-3, f"the adapter changes nothing ({effect})"
    print(f"PEFT vs rudder logits: max abs difference {worst:.2e} over {len(ours) // 2} sequences")
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()
