#!/usr/bin/env python3
"""Writes a random Llama for speed measurements; not committed.

    python3 tools/make_bench_model.py /tmp/llama-100m        # default: 100m
    python3 tools/make_bench_model.py /tmp/llama-19m 19m

100m: hidden 768, 8 layers, 12 heads (4 KV heads), intermediate 2048, vocab
32000, untied embeddings: 99.4M parameters, f16, 199 MB.
19m: hidden 256, 4 layers, 8 heads, intermediate 512, vocab 32000, untied,
f32: 19.0M parameters, 76 MB (the model of the llama.cpp lavapipe figure in
the performance issue).
The tokenizer is tiny-llama's (its ids are a subset of the 32000), so
`kvsift generate` works on them, padded so every id decodes to a word.
An existing model's tokenizer can be padded alone:

    python3 tools/make_bench_model.py --pad-only /tmp/llama-19m 32000
"""
import json
import os
import shutil
import sys


def pad_vocabulary(path, size):
    """Gives every id the model can sample a text ("Ġw<id>": a space and a
    word; unreachable by the merges, so encoding is unchanged), so that a
    stream of sampled tokens shows text (serving latencies are measured on
    text chunks)."""
    with open(path) as f:
        t = json.load(f)
    vocab = t["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in t.get("added_tokens", [])}
    for i in range(size):
        if i not in taken:
            vocab[f"\u0120w{i}"] = i
    with open(path, "w") as f:
        json.dump(t, f, ensure_ascii=False)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--pad-only":
    pad_vocabulary(os.path.join(sys.argv[2], "tokenizer.json"), int(sys.argv[3]))
    sys.exit(0)

import torch  # noqa: E402 (not needed to pad)
import transformers  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llama-100m"
size = sys.argv[2] if len(sys.argv) > 2 else "100m"
shapes = {
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=4),
    "19m": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8),
}[size]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=32000, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=1, **shapes,
)
model = transformers.LlamaForCausalLM(cfg).to(torch.float16 if size == "100m" else torch.float32)
model.save_pretrained(out)
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "tiny-llama")
for f in ["tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(os.path.join(src, f), out)
pad_vocabulary(os.path.join(out, "tokenizer.json"), cfg.vocab_size)
n = sum(p.numel() for p in model.parameters())
print(f"{out}: {n / 1e6:.1f}M parameters", file=sys.stderr)
