"""Write the chat recipe's bundled data (deterministic: run it again and the files are the same).

chat_sft.jsonl      conversations in TRL's `messages` format (some with a system turn, some with
                    two questions): concise, correct one-sentence answers
chat_prefs.jsonl    preference pairs in LLaMA-Factory's ShareGPT layout (`conversations` with
                    from/value, `chosen`/`rejected` one message each, an optional `system`): the
                    concise correct answer over a rambling or wrong one
chat_prompts.jsonl  held-out questions as TRL conversational prompts, with the `answer` the judge
                    looks for
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna",
    "Ireland": "Dublin", "Russia": "Moscow", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Cuba": "Havana", "Hungary": "Budapest", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Thailand": "Bangkok", "Turkey": "Ankara", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "India": "New Delhi", "Australia": "Canberra",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "a ripe tomato": "red", "an orange": "orange", "milk": "white",
    "a lemon": "yellow", "a strawberry": "red",
}
SOUNDS = {"a dog": "barks", "a cat": "meows", "a cow": "moos", "a lion": "roars", "a duck": "quacks",
          "a sheep": "bleats", "a horse": "neighs", "an owl": "hoots"}
SYSTEM = "You are a concise assistant. Answer in one short sentence."
RAMBLES = [
    "Well, that is a really interesting question and there are many ways to look at it, so let me think about it for a while before I answer.",
    "I am not completely sure, and I would not want to say something wrong, so you should probably look it up somewhere else.",
    "Great question! Before answering, let me tell you a little about the history of the question and why people ask it.",
]


def facts():
    out = []
    for country, city in CAPITALS.items():
        out.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.", city,
                    random.choice([c for c in CAPITALS.values() if c != city])))
    for thing, colour in COLOURS.items():
        out.append((f"What colour is {thing}?", f"It is {colour}.", colour,
                    random.choice([c for c in set(COLOURS.values()) if c != colour])))
    for animal, sound in SOUNDS.items():
        out.append((f"What sound does {animal} make?", f"{animal.capitalize()} {sound}.", sound,
                    random.choice([s for s in SOUNDS.values() if s != sound])))
    for _ in range(40):
        a, b = random.randint(2, 30), random.randint(2, 30)
        out.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b), str(a + b + random.choice([-2, -1, 1, 3]))))
    return out


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def main():
    random.seed(0)
    all_facts = facts()
    random.shuffle(all_facts)
    held_out, train = all_facts[:24], all_facts[24:]
    sft = []
    for i in range(240):
        q, a, _, _ = train[i % len(train)]
        messages = [user(q), assistant(a)]
        if i % 3 == 1:
            q2, a2, _, _ = random.choice(train)
            messages += [user(q2), assistant(a2)]
        if i % 4 == 0:
            messages = [{"role": "system", "content": SYSTEM}] + messages
        sft.append({"messages": messages})
    prefs = []
    for i in range(160):
        q, a, _, wrong = train[i % len(train)]
        if i % 2 == 0:
            rejected = random.choice(RAMBLES)
        else:
            rejected = a.replace(_answer(train[i % len(train)]), wrong)
        row = {
            "conversations": [{"from": "human", "value": q}],
            "chosen": {"from": "gpt", "value": a},
            "rejected": {"from": "gpt", "value": rejected},
        }
        if i % 4 == 0:
            row["system"] = SYSTEM
        prefs.append(row)
    prompts = [{"prompt": [user(q)], "answer": answer} for q, _, answer, _ in held_out]
    for name, rows in [("chat_sft.jsonl", sft), ("chat_prefs.jsonl", prefs), ("chat_prompts.jsonl", prompts)]:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _answer(fact):
    return fact[2]


if __name__ == "__main__":
    main()
