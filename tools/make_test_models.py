#!/usr/bin/env python3
"""Writes the tiny test checkpoints in models/ and their golden outputs.

    pip install torch transformers safetensors tokenizers
    python3 tools/make_test_models.py          # rewrites models/tiny-*

Each model directory is a real Hugging Face checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json) with random weights (fixed seeds), plus golden.safetensors:

  prompt_ids   i32 [T]      the prompt as transformers' tokenizer encodes it
  logits       f32 [T, V]   transformers' logits for the whole prompt (f32, eager attention)
  greedy_ids   i32 [N]      transformers' greedy continuation of the prompt
  greedy_gap   f32 [N]      top-1 minus top-2 logit at each greedy step
  metadata: prompt (text), chat_prompt (the chat template rendered for one
  user message with add_generation_prompt=True), transformers version.

The four models cover: GQA + llama3 rope_scaling + f32 (tiny-llama), q/k/v
biases + tied embeddings + G=4 + bf16 (tiny-qwen2), explicit head_dim != hidden/heads
+ q/k norms + bf16 + transformers-v5 config layout (tiny-qwen3), and a sliding
window shorter than the prompt + f16 (tiny-mistral). Configs of the first,
second and fourth are written in the layout found on the Hub (rope_theta,
rope_scaling, torch_dtype); the third in transformers v5's (rope_parameters, dtype).
"""
import json
import os
import random
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
VOCAB = 512
# The pre-tokenizer regex of Qwen2 / Llama 3 (needs fancy-regex on the Rust side).
SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]

PROMPT = (
    "The cache keeps every key and value the model has seen. Long chains of thought "
    "repeat themselves: check 12 + 7 = 19, then check it again. A budget of ten percent "
    "keeps most answers right, said the paper, and the memory it frees runs more requests."
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n\\n' "
    "+ message['content'] | trim + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n\\n' }}{% endif %}"
)


def corpus(seed=0, n=3000):
    rng = random.Random(seed)
    words = (
        "the a of to and in is it that for on with as was by at be this from are or an which one "
        "cache key value token model budget memory window attention head layer query check answer "
        "reason step think again first then so because number sum prime even odd count keep drop "
        "page pool block table score select kernel shader device buffer queue compute decode prefill"
    ).split()
    lines = [PROMPT, "Hello, world! 0123456789 +-*/=()[]{}:;,.?!'\"\n"]
    for _ in range(n):
        k = rng.randint(3, 14)
        s = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.3:
            s += f" {rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1999)}"
        lines.append(s.capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def make_tokenizer(add_bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def hub_style(cfg: dict) -> dict:
    """transformers v5 writes rope_parameters/dtype; Hub checkpoints carry rope_theta/rope_scaling/torch_dtype."""
    cfg = dict(cfg)
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    return cfg


def write_golden(ref, ids, out, metadata):
    """Writes out/golden.safetensors for the f32 model `ref` and prompt `ids`
    [1, T]: its logits, 24 greedy tokens and their top-1 minus top-2 logit
    gaps (the fields of the module docstring); metadata gets the
    transformers version. Returns (logits, gaps)."""
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
        # An explicit all-ones mask: generate() would otherwise infer one from
        # pad_token_id and mask a BOS that shares its id.
        gen = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, output_scores=True,
            return_dict_in_generate=True, eos_token_id=None, pad_token_id=ref.config.eos_token_id,
        )
    new = gen.sequences[0, ids.shape[1]:]
    gaps = []
    for s in gen.scores:
        top = torch.topk(s[0].float(), 2).values
        gaps.append(float(top[0] - top[1]))
    save_file(
        {
            "prompt_ids": ids[0].to(torch.int32).contiguous(),
            "logits": logits.contiguous(),
            "greedy_ids": new.to(torch.int32).contiguous(),
            "greedy_gap": torch.tensor(gaps, dtype=torch.float32),
        },
        os.path.join(out, "golden.safetensors"),
        metadata={**metadata, "transformers": transformers.__version__},
    )
    return logits, gaps


def build(name, cls, cfg_cls, dtype, hub_layout, seed, tok_bos, template, std, extra_json=None, **cfg_kwargs):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=VOCAB, initializer_range=std, attn_implementation="eager", **cfg_kwargs)
    tok = make_tokenizer(tok_bos)
    cfg.bos_token_id = tok.token_to_id("<|begin_of_text|>")
    cfg.eos_token_id = tok.token_to_id("<|end_of_text|>" if tok_bos else "<|im_end|>")
    model = cls(cfg).eval()
    with torch.no_grad():
        # Norm weights away from 1 so a missing norm shows.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    cfg_path = os.path.join(out, "config.json")
    cfg_json = json.load(open(cfg_path))
    if hub_layout:
        cfg_json = hub_style(cfg_json)
    cfg_json.update(extra_json or {})
    json.dump(cfg_json, open(cfg_path, "w"), indent=2, sort_keys=True)

    tok.save(os.path.join(out, "tokenizer.json"))
    bos, eos = "<|begin_of_text|>", tok.id_to_token(cfg.eos_token_id)
    json.dump(
        {
            "bos_token": bos,
            "eos_token": eos,
            "add_bos_token": tok_bos,
            "model_max_length": cfg.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": template,
        },
        open(os.path.join(out, "tokenizer_config.json"), "w"),
        indent=2,
    )

    # Goldens: reload exactly what was written, compute in f32.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ref = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True
    )
    logits, gaps = write_golden(ref, ids, out, {"prompt": PROMPT, "chat_prompt": chat})
    spread = logits.std(dim=-1).mean().item()
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, prompt {ids.shape[1]} tokens, "
          f"logit std {spread:.2f}, min greedy gap {min(gaps):.3f}", file=sys.stderr)


def main():
    common = dict(max_position_embeddings=512, rms_norm_eps=1e-5)
    build(
        "tiny-llama", transformers.LlamaForCausalLM, transformers.LlamaConfig, torch.float32, True, 1, True,
        LLAMA3_TEMPLATE, 0.08,
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        **common,
    )
    build(
        "tiny-qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config, torch.bfloat16, True, 2, False,
        CHATML, 0.08,
        hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=True, use_sliding_window=False,
        # As on the Hub (Qwen2.5 ships sliding_window with use_sliding_window false): must be ignored.
        extra_json={"sliding_window": 16, "max_window_layers": 1},
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common,
    )
    build(
        "tiny-qwen3", transformers.Qwen3ForCausalLM, transformers.Qwen3Config, torch.bfloat16, False, 3, False,
        CHATML, 0.08,
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common,
    )
    build(
        "tiny-mistral", transformers.MistralForCausalLM, transformers.MistralConfig, torch.float16, True, 4, True,
        LLAMA3_TEMPLATE, 0.08,
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common,
    )


if __name__ == "__main__":
    main()
