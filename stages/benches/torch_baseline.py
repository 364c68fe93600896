#!/usr/bin/env python3
"""The PyTorch side of `cargo bench -p rudder-stages --bench stages`: the same steps, one per
child process so that each peak resident memory is its own.

The LM and DPO steps are ../shared/bench/bench_torch.py's own functions (imported, unchanged);
the reward-model step is the same model with transformers' sequence-classification head on 8
pairs (16 x 256), Bradley-Terry loss, AdamW. Run in a virtualenv with torch and transformers, on
an idle machine:

    python stages/benches/torch_baseline.py [PATH/TO/bench_torch.py]
"""

import os
import resource
import subprocess
import sys
from pathlib import Path

DEFAULT_BASELINE = Path(__file__).resolve().parents[3] / "shared" / "bench" / "bench_torch.py"


def load(path):
    sys.path.insert(0, str(Path(path).parent))
    import bench_torch  # noqa: E402

    return bench_torch


def reward_step(bt):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=bt.VOCAB, hidden_size=bt.HIDDEN, intermediate_size=bt.INTER,
                      num_hidden_layers=bt.LAYERS, num_attention_heads=bt.HEADS,
                      num_key_value_heads=bt.KV_HEADS, max_position_embeddings=bt.SEQ, num_labels=1,
                      pad_token_id=0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForSequenceClassification(cfg).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, bt.VOCAB, (2 * bt.BATCH, bt.SEQ), generator=g)

    def step():
        rewards = model(input_ids=ids).logits.squeeze(-1)
        loss = -F.logsigmoid(rewards[: bt.BATCH] - rewards[bt.BATCH:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return bt.timed(step), 2 * bt.BATCH * bt.SEQ


def one(path, name):
    bt = load(path)
    if name == "lm":
        times, tokens, _ = bt.bench_lm("sdpa")
    elif name == "reward":
        times, tokens = reward_step(bt)
    else:
        times, tokens = bt.bench_dpo("sdpa")
    s = bt.summarize(times, tokens)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| torch {name:<20} | {s['mean_step_s']:>8.3f} | {s['min_step_s']:>6.3f} / "
          f"{s['max_step_s']:>6.3f} | {s['tokens_per_s']:>8.0f} | {peak:>9.0f} |")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[3], sys.argv[2])
        return
    path = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_BASELINE)
    print(f"| {'benchmark (sdpa, 2 threads)':<26} | mean (s) |   min / max (s) | tokens/s |  peak MiB |")
    print(f"| {'-' * 26} | -------- | --------------- | -------- | --------- |")
    for name in ["lm", "reward", "dpo"]:
        out = subprocess.run([sys.executable, __file__, "--one", name, path], capture_output=True,
                             text=True, env=dict(os.environ))
        print(out.stdout, end="")
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
