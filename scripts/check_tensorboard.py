#!/usr/bin/env python3
"""Reads the TensorBoard event files of rudder artifacts with TensorBoard's own event reader and
checks them against the artifacts' metrics.jsonl: every numeric field of every line must be the
scalar `train/FIELD` at that line's step (as float32).

    python3 scripts/check_tensorboard.py DIR [DIR ...]

DIR is an artifact directory (`rudder show RECIPE STAGE --path`) of a stage run with
`report_to = ["tensorboard"]`. Needs the `tensorboard` package (`pip install tensorboard`).
Exit status: 0 when every directory matches, 1 on a mismatch, 2 on a usage error.
"""

import glob
import json
import math
import os
import struct
import sys


def float32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def check(directory, event_accumulator):
    events = glob.glob(os.path.join(directory, "*tfevents*"))
    if len(events) != 1:
        return [f"{directory}: expected one event file, found {len(events)}"]
    acc = event_accumulator.EventAccumulator(directory, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    problems = []
    lines = 0
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            lines += 1
            step = record["step"]
            for name, value in record.items():
                if name == "step" or not isinstance(value, (int, float)):
                    continue
                tag = f"train/{name}"
                if tag not in tags:
                    problems.append(f"{directory}: no scalar {tag}")
                    continue
                at = [e for e in acc.Scalars(tag) if e.step == step]
                if len(at) != 1:
                    problems.append(f"{directory}: {tag} has {len(at)} values at step {step}")
                elif not math.isclose(at[0].value, float32(value), rel_tol=1e-6, abs_tol=1e-30):
                    problems.append(f"{directory}: {tag} at step {step} is {at[0].value}, metrics.jsonl has {value}")
    print(f"{directory}: {lines} logged steps, {len(tags)} scalar tags, event file {os.path.basename(events[0])}")
    return problems


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        print("error: the tensorboard package is not installed (pip install tensorboard)", file=sys.stderr)
        return 2
    problems = []
    for directory in argv[1:]:
        if not os.path.isfile(os.path.join(directory, "metrics.jsonl")):
            print(f"error: {directory} has no metrics.jsonl", file=sys.stderr)
            return 2
        problems += check(directory, event_accumulator)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
