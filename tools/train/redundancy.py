#!/usr/bin/env python3
"""Does R-KV's key similarity separate redundant text on this model? One
compression pass of R-KV (docs/kv-compression.md, section R-KV) over the
cache of held-out tally examples, computed in NumPy from the keys
transformers caches (post-RoPE), split by what each slot's token is:

  problem   the prompt (links, start): needed until its link is used
  step      a step line ("k2>m9 s=1"): the latest one is needed
  check     a re-check line ("check k2>m9 s=1", again, sure, recheck):
            redundant, never needed again

For each category: the mean redundancy term (softmax of the key-similarity
column means, the part R-KV subtracts; and before the softmax, the mean cosine
similarity of its key to every other key, less the last(i) rule's
protected entries), the mean importance (attention of
the last `window` queries, max-pooled), and the share of its slots R-KV
keeps at the budget against importance alone (lambda 1).

    python3 tools/train/redundancy.py models/tiny-reasoner [--n 20] [--at 512] [--budget 96]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402


def categories(prompt, solution, t):
    """The category of each of the first t tokens (character level, BOS first)."""
    cats = ["problem"] * (1 + len(prompt))
    for line in solution.split("\n"):
        kind = "check" if line.split(" ")[0] in tasks.CHECKS else "step"
        cats += [kind] * (len(line) + 1)
    return cats[:t]


def pool_max(x, kernel):
    if kernel <= 1:
        return x
    pad = kernel // 2
    xp = np.pad(x, (pad, pad), constant_values=-np.inf)
    return np.array([xp[i:i + kernel].max() for i in range(len(x))])


def rkv_terms(keys, queries, window, kernel, eps, threshold):
    """Importance and redundancy (contract, R-KV) of one KV head: keys [t, d],
    queries [g, window, d] (the group's last window queries)."""
    t, d = keys.shape
    c = t - window
    logits = np.einsum("gwd,sd->gws", queries, keys[:c]) / np.sqrt(d)
    logits = logits.max(axis=0)  # group max
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    importance = pool_max((e / e.sum(axis=1, keepdims=True)).mean(axis=0), kernel)
    kn = keys / (np.linalg.norm(keys, axis=1, keepdims=True) + eps)
    sim = kn @ kn.T
    np.fill_diagonal(sim, 0.0)
    colsum = np.zeros(t)
    for i in range(t):
        over = np.nonzero(sim[i] > threshold)[0]
        last = over[-1] if len(over) else 0
        row = sim[i].copy()
        row[last] = 0.0
        colsum += row
    colmean = colsum / t
    red = np.exp(colmean - colmean.max())
    red /= red.sum()
    return importance, red[:c], colmean[:c]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="models/tiny-reasoner")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--at", type=int, default=512, help="cache length at the pass")
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    a = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.LlamaForCausalLM.from_pretrained(
        a.model, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    stats = {}
    with open(os.path.join(a.model, "eval", "tally.jsonl")) as f:
        items = [json.loads(line) for line in f][: a.n]
    for item in items:
        text = item["prompt"] + item["solution"]
        ids = tok(text, return_tensors="pt").input_ids[:, : a.at]
        t = ids.shape[1]
        cats = categories(item["prompt"], item["solution"], t)
        with torch.no_grad():
            out = model(ids, use_cache=True, output_hidden_states=True)
        cache = out.past_key_values
        for li in range(cfg.num_hidden_layers):
            keys = cache.layers[li].keys[0].numpy()  # [hkv, t, d], post-RoPE
            # The last window queries, post-RoPE, recomputed from the layer input.
            layer = model.model.layers[li]
            hs = layer.input_layernorm(out.hidden_states[li])
            q = layer.self_attn.q_proj(hs).view(1, t, cfg.num_attention_heads, d).transpose(1, 2)
            pos = torch.arange(t)[None]
            cos, sin = model.model.rotary_emb(hs, pos)
            q = q * cos[:, None] + transformers.models.llama.modeling_llama.rotate_half(q) * sin[:, None]
            q = q[0, :, t - a.window:].detach().numpy()  # [hq, window, d]
            for kh in range(cfg.num_key_value_heads):
                imp, red, colmean = rkv_terms(keys[kh], q[kh * g:(kh + 1) * g], a.window, a.kernel,
                                     1e-8, a.threshold)
                c = t - a.window
                k = a.budget - a.window
                rkv = a.lam * imp - (1 - a.lam) * red
                kept_rkv = set(np.argsort(-rkv, kind="stable")[:k])
                kept_imp = set(np.argsort(-imp, kind="stable")[:k])
                for s in range(c):
                    st = stats.setdefault(cats[s], {"n": 0, "red": 0.0, "red2": 0.0, "sim": 0.0, "imp": 0.0, "rkv": 0, "imp_kept": 0})
                    st["n"] += 1
                    # x C: 1 is the uniform share (C varies when an example is shorter).
                    st["red"] += red[s] * c
                    st["red2"] += (red[s] * c) ** 2
                    st["sim"] += colmean[s]
                    st["imp"] += imp[s] * c
                    st["rkv"] += s in kept_rkv
                    st["imp_kept"] += s in kept_imp
    print(f"{len(items)} tally examples, a pass at {a.at} slots, budget {a.budget}, window {a.window}, "
          f"lambda {a.lam}; per category, over every layer and KV head:")
    print("| tokens | slots | mean key similarity (colmean) | redundancy (x 1/C): mean, sd | mean importance (x 1/C) | kept by R-KV | kept by importance only |")
    print("|---|---|---|---|---|---|---|")
    for cat in ("problem", "step", "check"):
        st = stats.get(cat)
        if not st:
            continue
        mean = st["red"] / st["n"]
        sd = max(st["red2"] / st["n"] - mean * mean, 0.0) ** 0.5
        print(f"| {cat} | {st['n']} | {st['sim'] / st['n']:.4f} | {mean:.4f}, {sd:.4f} | {st['imp'] / st['n']:.3f} | "
              f"{st['rkv'] / st['n']:.3f} | {st['imp_kept'] / st['n']:.3f} |")


if __name__ == "__main__":
    main()
