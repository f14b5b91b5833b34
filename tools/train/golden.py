#!/usr/bin/env python3
"""Writes golden.safetensors for a model trained by train.py: transformers'
f32 logits for the first held-out tally prompt, and 24 greedy tokens with
their top-2 logit gaps (tools/make_test_models.py's write_golden, the
fields tests/golden.rs reads; no chat_prompt: the model has no template).

    python3 tools/train/golden.py models/tiny-reasoner
"""
import json
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_test_models import write_golden  # noqa: E402


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "models/tiny-reasoner"
    with open(os.path.join(out, "eval", "tally.jsonl")) as f:
        prompt = json.loads(f.readline())["prompt"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.LlamaForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    _, gaps = write_golden(ref, ids, out, {"prompt": prompt})
    print(f"{out}: prompt {ids.shape[1]} tokens, min gap {min(gaps):.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
