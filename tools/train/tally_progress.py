#!/usr/bin/env python3
"""How far each tally trace stayed right: partial credit for a sweep's
examples.jsonl (kvsift eval --task tally --sweep writes each example's text).

Exact match only says whether the end line is right; this counts, per run,
the step lines (`<item>><next> s=<sum>`, re-check lines skipped) that match
the reference trace before the first wrong one, as a share of the chain's
links, and how many traces had every step right but a wrong or missing end
line. The reference trace is recomputed from the prompt (tasks.tally's
rules), so any set in the tally format works.

    python3 tools/train/tally_progress.py docs/eval/tally/examples.jsonl [models/tiny-reasoner/eval/tally.jsonl]
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402


def reference_steps(prompt):
    """The step lines a correct trace writes, from the prompt's links and start."""
    lines = prompt.strip().split("\n")
    links = dict(link.split(">") for link in lines[0].removeprefix("links: ").split())
    item = lines[1].removeprefix("start: ").strip()
    s = int(item[1])
    steps = []
    while item in links:
        nxt = links[item]
        s = (s + int(nxt[1])) % 10
        steps.append(f"{item}>{nxt} s={s}")
        item = nxt
    return steps


def progress(prompt, text):
    """(steps right before the first wrong one, steps in the chain, every step right)."""
    want = reference_steps(prompt)
    wrote = [line.strip() for line in text.split("\n")
             if line.strip() and line.split(" ")[0] not in tasks.CHECKS and " end " not in line]
    right = 0
    for got, ref in zip(wrote, want):
        if got != ref:
            break
        right += 1
    return right, len(want), right == len(want)


def main():
    runs_path = sys.argv[1]
    set_path = sys.argv[2] if len(sys.argv) > 2 else "models/tiny-reasoner/eval/tally.jsonl"
    with open(set_path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    runs = {}
    with open(runs_path) as f:
        for line in f:
            e = json.loads(line)
            if e["task"] != "tally" or "text" not in e:
                continue
            right, total, all_steps = progress(prompts[e["example"]], e["text"])
            r = runs.setdefault((e["kv"], e["budget"]), {"n": 0, "share": 0.0, "steps_only": 0, "correct": 0})
            r["n"] += 1
            r["share"] += right / total
            r["steps_only"] += all_steps and not e["correct"]
            r["correct"] += e["correct"]
    if not runs:
        sys.exit(f"{runs_path}: no tally examples with their text")
    print("| method | B | n | steps right before the first error | every step right, end line wrong | exact match |")
    print("|---|---|---|---|---|---|")
    for (kv, budget), r in runs.items():
        print(f"| {kv} | {budget if budget is not None else '-'} | {r['n']} | {r['share'] / r['n']:.3f} | "
              f"{r['steps_only'] / r['n']:.3f} | {r['correct'] / r['n']:.3f} |")


if __name__ == "__main__":
    main()
