"""Score chat answers, independently of any model: a judge command for recipes/chat.toml.

Reads JSONL objects with `prompt` (the rendered conversation) and `completion` on stdin, writes
one number per line: 1 when the completion states the question's answer (from
chat_prompts.jsonl, matched by the question in the prompt), minus 0.05 per word beyond 12 (a
concise answer scores higher), in [-1, 1].
"""

import json
import re
import sys
from pathlib import Path

ANSWERS = {
    row["prompt"][-1]["content"]: row["answer"]
    for row in map(json.loads, (Path(__file__).parent / "chat_prompts.jsonl").read_text().splitlines())
}


def score(prompt, completion):
    answer = next((a for q, a in ANSWERS.items() if q in prompt), None)
    correct = answer is not None and re.search(rf"\b{re.escape(answer.lower())}\b", completion.lower())
    words = len(completion.split())
    return max(-1.0, min(1.0, float(bool(correct)) - 0.05 * max(0, words - 12)))


def main():
    for line in sys.stdin:
        if line.strip():
            row = json.loads(line)
            print(score(row["prompt"], row["completion"]))


if __name__ == "__main__":
    main()
