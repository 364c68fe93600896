"""Generate the quickstart's bundled data: a controlled-sentiment continuation task.

Movie-review openings are continued by the model; an independent rule (sentiment.py, a word
lexicon) scores how positive a continuation is. Pretraining and SFT data mix positive and
negative reviews half and half, so a model trained on them is neutral on average; the preference
pairs prefer the positive continuation of the same opening, so preference optimisation should
raise the score while the text stays fluent. This mirrors the DPO paper's IMDb experiment at a
size that trains on a laptop CPU.

    python3 recipes/data/generate.py          # rewrites the files beside this script

Deterministic: the same seed writes byte-identical files.
"""

import json
import pathlib
import random

SEED = 20261126
HERE = pathlib.Path(__file__).resolve().parent

SUBJECTS = ["The movie", "The film", "This picture", "The story", "The sequel", "The documentary",
            "The thriller", "The comedy", "The drama", "The musical", "The western", "The cartoon"]
ASPECTS = ["the acting", "the script", "the music", "the ending", "the plot", "the dialogue",
           "the camera work", "the pacing", "the cast", "the soundtrack", "the humour", "the set design"]
POSITIVE = ["wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping",
            "beautiful", "excellent", "funny", "clever", "touching"]
NEGATIVE = ["terrible", "boring", "dreadful", "awful", "clumsy", "dull", "painful", "weak",
            "tedious", "messy", "bland", "silly"]
POS_CLOSERS = ["I loved every minute.", "I would watch it again.", "A real treat.",
               "Highly recommended.", "It made my day."]
NEG_CLOSERS = ["I hated every minute.", "I want my money back.", "A real waste.",
               "Not recommended.", "It ruined my day."]


def opening(rng):
    return f"Review: {rng.choice(SUBJECTS)} was"


def continuation(rng, positive):
    words, closers = (POSITIVE, POS_CLOSERS) if positive else (NEGATIVE, NEG_CLOSERS)
    first, second = rng.sample(words, 2)
    return f" {first} and {rng.choice(ASPECTS)} was {second}. {rng.choice(closers)}"


def write_jsonl(name, rows):
    with open(HERE / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def main():
    rng = random.Random(SEED)
    corpus = []
    for i in range(4000):
        corpus.append(opening(rng) + continuation(rng, positive=i % 2 == 0))
    (HERE / "corpus.txt").write_text("\n".join(corpus) + "\n")

    sft = []
    for i in range(600):
        sft.append({"prompt": opening(rng), "completion": continuation(rng, positive=i % 2 == 0)})
    write_jsonl("sft.jsonl", sft)

    prefs = []
    for _ in range(600):
        prompt = opening(rng)
        prefs.append({"prompt": prompt, "chosen": continuation(rng, True),
                      "rejected": continuation(rng, False)})
    write_jsonl("prefs.jsonl", prefs)

    prompts = [{"prompt": f"Review: {subject} was"} for subject in SUBJECTS]
    write_jsonl("prompts.jsonl", prompts)


if __name__ == "__main__":
    main()
