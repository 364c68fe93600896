"""Score the sentiment of completions with a word lexicon, independently of any model.

A judge command: reads JSONL objects with `prompt` and `completion` on stdin and writes one
number per line: (positive words - negative words) / max(1, words that are either), in [-1, 1].
"""

import json
import re
import sys

POSITIVE = {"wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping",
            "beautiful", "excellent", "funny", "clever", "touching", "loved", "recommended",
            "treat", "again"}
NEGATIVE = {"terrible", "boring", "dreadful", "awful", "clumsy", "dull", "painful", "weak",
            "tedious", "messy", "bland", "silly", "hated", "waste", "ruined", "back"}


def score(text):
    words = re.findall(r"[a-z]+", text.lower())
    positive = sum(w in POSITIVE for w in words)
    negative = sum(w in NEGATIVE for w in words)
    return (positive - negative) / max(1, positive + negative)


def main():
    for line in sys.stdin:
        if line.strip():
            print(score(json.loads(line)["completion"]))


if __name__ == "__main__":
    main()
