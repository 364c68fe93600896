#!/usr/bin/env python3
"""Writes the chat goldens the Rust tests compare with (stages/tests/chat.rs): TRL 1.16's
tokenisation of conversational data on the reference fixture model with a ChatML chat template.

Usage (torch 2.15, transformers 5.24, trl 1.16):
    python stages/tests/data/chat/make_goldens.py

Reads ../shared/fixtures (policy, reference, tokenizer) and the files beside this script:
    chatml.jinja           SmolLM2-135M-Instruct's chat template, with the fixture tokenizer's
                           <|bos|> / <|eos|> in place of SmolLM2's <|im_start|> / <|im_end|>
                           (SmolLM2's BOS and EOS), so every turn opens with BOS and closes with EOS
    chatml_training.jinja  the same rendering with {% generation %} around each assistant turn's
                           output (content + <|eos|> + newline), the form TRL's assistant-only loss
                           needs
    prefs.jsonl            conversational preference pairs with explicit prompts (a system turn,
                           a multi-turn prompt)
    prefs_implicit.jsonl   pairs with implicit prompts (whole conversations; TRL extracts the
                           longest common message prefix)
    sft.jsonl              multi-turn conversations (TRL `messages`)
Writes golden.json: for each preference file DPOTrainer's tokenisation (prompt_ids, chosen_ids, rejected_ids) and its
precomputed reference log-probs (precompute_ref_log_probs, reference = fixtures/reference), and
SFTTrainer's input_ids and labels with assistant_only_loss on the training template, with the
policy's token-mean loss on that batch; the policy's greedy answers (model.generate) to three
conversational prompts. CPU, fp32 (bf16 off), one thread, deterministic.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="chat_goldens_"))

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[3] / ".." / "shared" / "fixtures"
FIXTURES = FIXTURES.resolve()

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.manual_seed(0)


def model_dir(tmp: Path, weights: str, template: str) -> Path:
    out = tmp / f"{weights}-{template}"
    out.mkdir()
    for f in (FIXTURES / weights).iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((FIXTURES / "tokenizer" / "tokenizer_config.json").read_text())
    config["chat_template"] = (HERE / f"{template}.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def rows(name: str) -> list:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def dpo(tmp: Path, data: str) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=tmp))
    policy = model_dir(tmp, "policy", "chatml")
    reference = model_dir(tmp, "reference", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    args = DPOConfig(
        output_dir=str(tmp / "dpo"),
        per_device_train_batch_size=4,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=4,
        max_length=None,
        report_to=[],
        bf16=False,
        use_cpu=True,
        dataset_num_proc=None,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy, attn_implementation="eager"),
        ref_model=AutoModelForCausalLM.from_pretrained(reference, attn_implementation="eager"),
        args=args,
        train_dataset=Dataset.from_list(rows(data)),
        processing_class=tokenizer,
    )
    data = trainer.train_dataset
    return {
        "examples": [
            {
                "prompt_ids": data[i]["prompt_ids"],
                "chosen_ids": data[i]["chosen_ids"],
                "rejected_ids": data[i]["rejected_ids"],
                "ref_chosen_logps": float(data[i]["ref_chosen_logps"]),
                "ref_rejected_logps": float(data[i]["ref_rejected_logps"]),
            }
            for i in range(len(data))
        ]
    }


def sft(tmp: Path) -> dict:
    policy = model_dir(tmp, "policy", "chatml_training")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, attn_implementation="eager")
    args = SFTConfig(
        output_dir=str(tmp / "sft"),
        assistant_only_loss=True,
        max_length=None,
        report_to=[],
        bf16=False,
        use_cpu=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows("sft.jsonl")),
        processing_class=tokenizer,
    )
    data = trainer.train_dataset
    examples = []
    for i in range(len(data)):
        ids = data[i]["input_ids"]
        labels = data[i]["labels"] if "labels" in data.column_names else [
            t if m else -100 for t, m in zip(ids, data[i]["assistant_masks"])
        ]
        examples.append({"input_ids": ids, "labels": labels})
    # The policy's loss on the whole set as one batch: summed NLL of the labelled tokens over
    # their count (labels at position j are predicted from position j - 1).
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logits = model(ids).logits[0, :-1].float()
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            logp = torch.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None])
            total += float(-logp.sum())
            count += int(keep.sum())
    return {"examples": examples, "loss": total / count}


def generation(tmp: Path) -> dict:
    """Greedy answers of the policy to conversational prompts: the prompt rendered with the
    generation prompt, 16 new tokens at most, stopping at EOS."""
    policy = model_dir(Path(tempfile.mkdtemp(dir=tmp)), "policy", "chatml")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, attn_implementation="eager")
    out = []
    for messages in GENERATION_PROMPTS:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            generated = model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id
            )[0, len(ids) :].tolist()
        out.append(
            {
                "messages": messages,
                "prompt_ids": ids,
                "new_ids": generated,
                "text": tokenizer.decode(generated, skip_special_tokens=True),
            }
        )
    return {"examples": out}


GENERATION_PROMPTS = [
    [{"role": "user", "content": "What color is the sky?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the fox."}],
    [{"role": "user", "content": "Review: The film was"}],
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        golden = {
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
            "dpo": dpo(Path(tmp), "prefs.jsonl"),
            "dpo_implicit": dpo(Path(tmp), "prefs_implicit.jsonl"),
            "sft": sft(Path(tmp)),
            "generation": generation(Path(tmp)),
        }
    (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {HERE / 'golden.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
