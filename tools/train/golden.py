#!/usr/bin/env python3
"""Writes golden.safetensors for a model trained by train.py: transformers'
f32 logits for the first held-out chain prompt, and 24 greedy tokens with
their top-2 logit gaps (the same fields tools/make_test_models.py writes for
the random test models, read by tests/golden.rs).

    python3 tools/train/golden.py models/tiny-reasoner
"""
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "models/tiny-reasoner"
    with open(os.path.join(out, "eval", "chain.jsonl")) as f:
        prompt = json.loads(f.readline())["prompt"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.LlamaForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
        gen = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
            output_scores=True, return_dict_in_generate=True, eos_token_id=None,
            pad_token_id=ref.config.eos_token_id,
        )
    new = gen.sequences[0, ids.shape[1]:]
    gaps = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in gen.scores]
    save_file(
        {
            "prompt_ids": ids[0].to(torch.int32).contiguous(),
            "logits": logits.contiguous(),
            "greedy_ids": new.to(torch.int32).contiguous(),
            "greedy_gap": torch.tensor(gaps, dtype=torch.float32),
        },
        os.path.join(out, "golden.safetensors"),
        metadata={"prompt": prompt, "transformers": transformers.__version__},
    )
    print(f"{out}: prompt {ids.shape[1]} tokens, greedy {tok.decode(new)!r}, "
          f"min gap {min(gaps):.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
