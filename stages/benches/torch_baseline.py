#!/usr/bin/env python3
"""The PyTorch side of `cargo bench -p rudder-stages --bench stages`: the same steps, one per
child process so that each peak resident memory is its own.

The LM and DPO steps are ../shared/bench/bench_torch.py's own functions (imported, unchanged);
the reward-model step is the same model with transformers' sequence-classification head on 8
pairs (16 x 256), Bradley-Terry loss, AdamW. `lm-135m` is the LM step on SmolLM2-135M's shape
(30 layers, hidden 576, 9 heads over 3 KV heads, intermediate 1536, tied vocab 49,152; random
weights, fp32) at 4 x 256, the shape of `rudder bench sft --model fresh:smollm2-135m --batch 4`;
`generate-135m` is greedy decoding with the KV cache (`generate`, 4 prompts of 32 tokens, 64 new
tokens each), the counterpart of rudder's generation on the same model. Run in a virtualenv with
torch and transformers, on an idle machine:

    python stages/benches/torch_baseline.py [PATH/TO/bench_torch.py] [--only NAME ...]
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


SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, use_cache=False)


def smollm2(bt):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOL)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float()


def lm_135m_step(bt):
    import torch

    model = smollm2(bt)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SMOL["vocab_size"], (4, 256), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Fewer steps than the 4M model's: one step takes seconds.
    bt.WARMUP, bt.STEPS = 2, 5
    return bt.timed(step), 4 * 256


def generate_135m(bt):
    import torch

    model = smollm2(bt)
    model.eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, SMOL["vocab_size"], (4, 32), generator=g)
    new = 64

    def step():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)

    bt.WARMUP, bt.STEPS = 1, 3
    return bt.timed(step), 4 * new


def one(path, name):
    bt = load(path)
    if name == "lm":
        times, tokens, _ = bt.bench_lm("sdpa")
    elif name == "reward":
        times, tokens = reward_step(bt)
    elif name == "lm-135m":
        times, tokens = lm_135m_step(bt)
    elif name == "generate-135m":
        times, tokens = generate_135m(bt)
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
    args = sys.argv[1:]
    only = [args[i + 1] for i, a in enumerate(args) if a == "--only"]
    rest = [a for i, a in enumerate(args) if a != "--only" and (i == 0 or args[i - 1] != "--only")]
    path = rest[0] if rest else str(DEFAULT_BASELINE)
    print(f"| {'benchmark (sdpa, 2 threads)':<26} | mean (s) |   min / max (s) | tokens/s |  peak MiB |")
    print(f"| {'-' * 26} | -------- | --------------- | -------- | --------- |")
    for name in only or ["lm", "reward", "dpo", "lm-135m", "generate-135m"]:
        out = subprocess.run([sys.executable, __file__, "--one", name, path], capture_output=True,
                             text=True, env=dict(os.environ))
        print(out.stdout, end="")
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)


if __name__ == "__main__":
    main()
