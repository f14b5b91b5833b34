#!/usr/bin/env python3
"""Trains kvsift's tiny reasoning model on the two task families of
tools/train/tasks.py and writes an HF Llama checkpoint (config.json, f16
model.safetensors, tokenizer.json, generation_config.json) plus held-out
eval sets (eval/needle.jsonl, eval/chain.jsonl).

    python3 tools/train/train.py --out models/tiny-reasoner --steps 1100

Deterministic for a seed on one machine (torch CPU, 2 threads): a fixed
number of steps, each over --tokens-per-step tokens of freshly generated
examples. It logs the loss and the teacher-forced exact-match accuracy of
held-out examples (every answer token the argmax; equal to greedy
decoding's exact match), and the wall time.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]


def build_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in tasks.ALPHABET:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    tok.add_special_tokens(SPECIALS)
    return tok, vocab


def example(rng, kind, curriculum):
    """A training example; `curriculum` in [0, 1] grows the haystack from
    60 to 1500 characters and the chain from 2 to 30 links."""
    if kind == "needle":
        hi = int(60 + (1500 - 60) * curriculum)
        prompt, answer = tasks.needle(rng, min(300, hi) // 2, max(60, hi))
        return prompt, answer + "\n"
    hops = max(2, int(2 + 28 * curriculum))
    return tasks.chain(rng, hops_min=max(2, hops // 2), hops_max=hops,
                       distractors=max(1, int(8 * curriculum)))


def encode(vocab, text):
    return [vocab[c] for c in text]


def batch_of(rng, vocab, token_budget, curriculum):
    """Examples (input ids, loss mask on the answer) up to token_budget tokens."""
    seqs = []
    total = 0
    while True:
        kind = "needle" if rng.random() < 0.5 else "chain"
        prompt, answer = example(rng, kind, curriculum)
        ids = [0] + encode(vocab, prompt) + encode(vocab, answer) + [1]
        mask = [0] * (1 + len(prompt)) + [1] * (len(answer) + 1)
        if seqs and total + len(ids) > token_budget:
            break
        seqs.append((ids, mask))
        total += len(ids)
    n = max(len(s[0]) for s in seqs)
    x = torch.full((len(seqs), n), 2, dtype=torch.long)
    m = torch.zeros((len(seqs), n), dtype=torch.float)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        x[i, : len(ids)] = torch.tensor(ids)
        m[i, : len(ids)] = torch.tensor(mask, dtype=torch.float)
        att[i, : len(ids)] = 1
    return x, m, att


@torch.no_grad()
def teacher_forced_accuracy(model, vocab, items):
    """Share of items whose every answer token is the argmax given the gold
    prefix: equal to greedy decoding's exact match of the whole answer."""
    ok = 0
    for prompt, answer in items:
        ids = [0] + encode(vocab, prompt) + encode(vocab, answer)
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0]
        start = 1 + len(prompt)
        pred = logits[start - 1 : len(ids) - 1].argmax(-1)
        ok += int(torch.equal(pred, x[0, start:]))
    return ok / len(items)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/tiny-reasoner")
    ap.add_argument("--steps", type=int, default=1100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens-per-step", type=int, default=6144)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-n", type=int, default=200)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    rng = random.Random(a.seed)
    tok, vocab = build_tokenizer()
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocab {len(vocab)}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)

    # Held-out sets from a separate seed.
    eval_rng = random.Random(10_000 + a.seed)
    held = {
        "needle": [(lambda p: (p[0], p[1]))(tasks.needle(eval_rng)) for _ in range(a.eval_n)],
        "chain": [tasks.chain(eval_rng) for _ in range(a.eval_n)],
    }
    probe = {
        "needle": [(p, ans + "\n") for p, ans in held["needle"][:20]],
        "chain": held["chain"][:20],
    }

    start = time.time()
    step = 0
    while step < a.steps:
        frac = step / a.steps
        lr = a.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, m, att = batch_of(rng, vocab, a.tokens_per_step, min(1.0, 1.5 * frac))
        logits = model(input_ids=x, attention_mask=att).logits[:, :-1]
        tgt = x[:, 1:]
        mask = m[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none"
        )
        loss = (loss * mask.reshape(-1)).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            model.eval()
            acc = {k: teacher_forced_accuracy(model, vocab, v) for k, v in probe.items()}
            model.train()
            print(
                f"step {step} {time.time() - start:.0f}s loss {loss.item():.4f} lr {lr:.2e} "
                f"probe needle {acc['needle']:.2f} chain {acc['chain']:.2f}",
                flush=True,
            )

    model.eval()
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    model.to(torch.float16).save_pretrained(a.out, safe_serialization=True)
    model.to(torch.float32)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)
    for name, items in held.items():
        with open(os.path.join(a.out, "eval", f"{name}.jsonl"), "w") as f:
            for prompt, answer in items:
                final = answer if name == "needle" else tasks.answer_of("chain", answer)
                f.write(json.dumps({"prompt": prompt, "answer": final, "solution": answer}) + "\n")
    acc = {k: teacher_forced_accuracy(model, vocab, [(p, s + "\n" if k == "needle" else s) for p, s in v[:100]])
           for k, v in held.items()}
    print(f"done: {step} steps in {time.time() - start:.0f}s; held-out teacher-forced exact match "
          f"(first 100): needle {acc['needle']:.2f}, chain {acc['chain']:.2f}", flush=True)


if __name__ == "__main__":
    main()
