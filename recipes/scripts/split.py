"""Split a JSONL file into train and eval parts, deterministically (every Nth row to eval)."""
import json
import sys

source, train_path, eval_path, every = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(source) as f:
    rows = [json.loads(line) for line in f if line.strip()]
with open(train_path, "w") as train, open(eval_path, "w") as evaluation:
    for i, row in enumerate(rows):
        target = evaluation if i % every == every - 1 else train
        target.write(json.dumps(row) + "\n")
