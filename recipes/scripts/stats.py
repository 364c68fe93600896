"""Count rows and mean completion length (in words) of JSONL files; write a JSON summary."""
import json
import sys

out, paths = sys.argv[1], sys.argv[2:]
summary = {}
for path in paths:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    words = [len(r.get("completion", r.get("chosen", "")).split()) for r in rows]
    summary[path.rsplit("/", 1)[-1]] = {"rows": len(rows), "mean_words": sum(words) / max(len(rows), 1)}
with open(out, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
