#!/usr/bin/env python3
"""Writes GGUF versions of the shipped test models, and the logits
transformers computes for them, into tests/data/gguf/models/:

  <name>.gguf                 written with the `gguf` package (llama.cpp's own
                              writer): metadata as convert_hf_to_gguf.py writes
                              it (tokenizer.ggml.* byte-level BPE vocabulary,
                              chat template), Llama's q/k rows permuted as its
                              converter permutes them, blocks from gguf.quants
  <name>.golden.safetensors   prompt_ids i32 [T], logits f32 [T, V]: the file
                              read back with gguf.GGUFReader, every tensor
                              dequantized with gguf.quants.dequantize (q/k rows
                              un-permuted), run by transformers in f32 (eager)
  <model>.load-<q>.golden.safetensors
                              the shipped safetensors checkpoint with every
                              matrix (embeddings and lm_head included) quantized
                              and dequantized row by row with gguf.quants, run
                              by transformers: what `--weights-dtype <q>
                              --quantize-lm-head` must give

The models: tiny-llama in f16, q8_0 and q4_0 (llama arch: permuted q/k; its
llama3 rope scaling as the rope_freqs.weight tensor the converter writes),
tiny-qwen2 in q8_0 (q/k/v biases, tied embeddings),
tiny-qwen3 in q4_0 (q/k norms, head_dim != hidden/heads), and tiny-kquant, a
random llama-arch model of 256-wide rows mixing q4_K and q6_K the way a
Q4_K_M file does (attn_v, ffn_down and output q6_K, the rest q4_K; random
blocks, as the gguf package has no K quantizer).

    pip install gguf numpy torch transformers safetensors
    python3 tools/make_gguf_models.py
"""
import json
import os

import numpy as np
import torch
import transformers
import gguf
from gguf import GGMLQuantizationType as T
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "models")
OUT = os.path.join(ROOT, "tests", "data", "gguf", "models")

GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, kind = parts[2], parts[-1]
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{kind}"


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, rows [j*d/2 + i] -> [2i + j]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_hf(name):
    d = os.path.join(MODELS, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    from safetensors.torch import load_file as load_torch
    weights = {k: v.float().numpy() for k, v in load_torch(os.path.join(d, "model.safetensors")).items()}
    from safetensors import safe_open
    with safe_open(os.path.join(d, "golden.safetensors"), "np") as f:
        ids = f.get_tensor("prompt_ids")
        prompt = f.metadata()["prompt"]
    return d, cfg, weights, ids, prompt


def heads(cfg):
    return cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def write_tokenizer(w, model_dir, pre):
    tj = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    tc = json.load(open(os.path.join(model_dir, "tokenizer_config.json")))
    vocab = dict(tj["model"]["vocab"])
    for a in tj["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tj["added_tokens"] if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tc["bos_token"]])
    w.add_eos_token_id(vocab[tc["eos_token"]])
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])


def write_gguf(path, cfg, weights, model_dir, qtype_of):
    """weights: HF name -> f32 array (HF layout), or (bytes uint8 [rows, row_bytes], qtype)
    for blocks made elsewhere. qtype_of(hf_name, array) -> the GGML type of a float tensor."""
    arch = GGUF_ARCH[cfg["architectures"][0]]
    n_head, n_kv = heads(cfg)
    hd = head_dim(cfg)
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    write_tokenizer(w, model_dir, "qwen2")
    if llama3_scaling(cfg):
        w.add_tensor("rope_freqs.weight", rope_factors(cfg))
    for hf, value in weights.items():
        name = gguf_name(hf)
        if isinstance(value, tuple):
            blocks, qtype = value
            w.add_tensor(name, blocks, raw_dtype=qtype)
            continue
        a = value
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute(a, n_head if "attn_q" in name else n_kv)
        qtype = qtype_of(hf, a) if a.ndim == 2 else T.F32
        if qtype == T.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path, cfg):
    """The file's tensors as f32 in HF layout, through gguf's own reader."""
    r = gguf.GGUFReader(path)
    arch = GGUF_ARCH[cfg["architectures"][0]]
    n_head, n_kv = heads(cfg)
    inv = {}
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        a = a.reshape(shape)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            a = unpermute(a, n_head if "attn_q" in t.name else n_kv)
        inv[t.name] = a
    for hf_name in hf_names(cfg):
        g = gguf_name(hf_name)
        if g in inv:
            out[hf_name] = inv[g]
    return out


def hf_names(cfg):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for l in range(cfg["num_hidden_layers"]):
        for k in HF_TO_GGUF:
            for kind in ("weight", "bias"):
                names.append(f"model.layers.{l}.{k}.{kind}")
    return names


def hf_logits(cfg, weights, ids):
    config = transformers.AutoConfig.for_model(**{**cfg, "model_type": {
        "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[cfg["architectures"][0]]})
    config._attn_implementation = "eager"
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls(config).eval().float()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.get("tie_word_embeddings"))]
    assert not missing and not unexpected, (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)[None]).logits[0].float()


def save_golden(path, ids, logits, meta):
    save_file({"prompt_ids": torch.tensor(ids, dtype=torch.int32), "logits": logits.contiguous()}, path,
              metadata={**meta, "transformers": transformers.__version__, "gguf": gguf.__version__
                        if hasattr(gguf, "__version__") else "?"})


def llama3_scaling(cfg):
    s = cfg.get("rope_scaling") or {}
    return s if (s.get("rope_type") or s.get("type")) == "llama3" else None


def rope_factors(cfg):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3.1's
    rope scaling as one divisor per frequency (rope_freqs.weight)."""
    import math
    s = llama3_scaling(cfg)
    base = cfg.get("rope_theta", 10000.0)
    dim = head_dim(cfg)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def gguf_cfg(cfg):
    """What llama.cpp runs of a config converted to GGUF: no sliding window;
    llama3 rope scaling kept (the file carries it as rope_freqs.weight)."""
    c = dict(cfg)
    if not llama3_scaling(cfg):
        c.pop("rope_scaling", None)
    c.pop("rope_parameters", None)
    c["rope_theta"] = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    c.pop("sliding_window", None)
    c["use_sliding_window"] = False
    c.pop("layer_types", None)
    c.pop("dtype", None)
    c.pop("torch_dtype", None)
    return c


def model_file(name, fmt, qtype):
    d, cfg, weights, ids, prompt = load_hf(name)
    cfg = gguf_cfg(cfg)
    path = os.path.join(OUT, f"{name}.{fmt}.gguf")
    write_gguf(path, cfg, weights, d, lambda hf, a: qtype)
    back = read_back(path, cfg)
    save_golden(os.path.join(OUT, f"{name}.{fmt}.golden.safetensors"), ids, hf_logits(cfg, back, ids),
                {"prompt": prompt, "source": f"models/{name}", "format": fmt})
    print(path, os.path.getsize(path))


def quantized_load(name, fmt, qtype):
    """The safetensors model with every matrix through gguf.quants (round trip)."""
    d, cfg, weights, ids, prompt = load_hf(name)
    q = {}
    for k, v in weights.items():
        q[k] = gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype).reshape(v.shape) if v.ndim == 2 else v
    c = dict(cfg)
    c.pop("torch_dtype", None)
    c.pop("dtype", None)
    save_golden(os.path.join(OUT, f"{name}.load-{fmt}.golden.safetensors"), ids, hf_logits(c, q, ids),
                {"prompt": prompt, "source": f"models/{name}", "format": f"--weights-dtype {fmt} --quantize-lm-head"})


def kquant_model():
    """A random llama-arch model of 256-wide rows in a Q4_K_M-like mix."""
    rng = np.random.default_rng(23)
    d, cfg0, _, ids, prompt = load_hf("tiny-llama")
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
           "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
           "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": cfg0["bos_token_id"],
           "eos_token_id": cfg0["eos_token_id"]}

    def blocks(rows, cols, qtype):
        block_w, block_b = gguf.GGML_QUANT_SIZES[qtype]
        n = rows * cols // block_w
        b = rng.integers(0, 256, size=(n, block_b), dtype=np.uint8)
        scale = lambda lo, hi: np.frombuffer(rng.uniform(lo, hi, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
        if qtype == T.Q4_K:
            # Centered weights d*sc*(q - 7.5), at most ~0.2: every sub-block's
            # 6-bit min equals its scale (of the 12 scale bytes at 4, bytes 4-7
            # copy 0-3 and bytes 8-11 hold one nibble twice) and dmin = 7.5 d.
            b[:, 8:12] = b[:, 4:8]
            b[:, 12:16] = (b[:, 12:16] & 0xF) * 17
            d = rng.uniform(0.0001, 0.0003, n).astype(np.float16)
            b[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8).reshape(n, 2)
            b[:, 2:4] = np.frombuffer((d.astype(np.float32) * 7.5).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
        else:
            # d*sc*(q - 32), int8 sc, 6-bit q: at most ~0.1.
            b[:, 208:210] = scale(0.00001, 0.00003)
        return b.reshape(rows, cols // block_w * block_b), qtype

    h, i, v = 256, 512, 512
    weights = {"model.embed_tokens.weight": blocks(v, h, T.Q4_K), "lm_head.weight": blocks(v, h, T.Q6_K),
               "model.norm.weight": (1.0 + 0.3 * rng.standard_normal(h)).astype(np.float32)}
    for l in range(2):
        p = f"model.layers.{l}"
        weights[f"{p}.input_layernorm.weight"] = (1.0 + 0.3 * rng.standard_normal(h)).astype(np.float32)
        weights[f"{p}.post_attention_layernorm.weight"] = (1.0 + 0.3 * rng.standard_normal(h)).astype(np.float32)
        for proj, rows, cols, qt in [("self_attn.q_proj", 256, h, T.Q4_K), ("self_attn.k_proj", 128, h, T.Q4_K),
                                     ("self_attn.v_proj", 128, h, T.Q6_K), ("self_attn.o_proj", h, 256, T.Q4_K),
                                     ("mlp.gate_proj", i, h, T.Q4_K), ("mlp.up_proj", i, h, T.Q4_K),
                                     ("mlp.down_proj", h, i, T.Q6_K)]:
            weights[f"{p}.{proj}.weight"] = blocks(rows, cols, qt)
    path = os.path.join(OUT, "tiny-kquant.q4_k_m.gguf")
    # Blocks are written as they are (attn_q/attn_k: the permuted order is
    # what the file holds; read_back un-permutes them for transformers).
    write_gguf(path, cfg, weights, d, None)
    back = read_back(path, cfg)
    save_golden(os.path.join(OUT, "tiny-kquant.q4_k_m.golden.safetensors"), ids, hf_logits(cfg, back, ids),
                {"prompt": prompt, "source": "random q4_K/q6_K blocks", "format": "q4_k_m"})
    print(path, os.path.getsize(path))


def main():
    os.makedirs(OUT, exist_ok=True)
    model_file("tiny-llama", "f16", T.F16)
    model_file("tiny-llama", "q8_0", T.Q8_0)
    model_file("tiny-llama", "q4_0", T.Q4_0)
    model_file("tiny-qwen2", "q8_0", T.Q8_0)
    model_file("tiny-qwen3", "q4_0", T.Q4_0)
    kquant_model()
    quantized_load("tiny-llama", "q8_0", T.Q8_0)
    quantized_load("tiny-llama", "q4_0", T.Q4_0)
    quantized_load("tiny-qwen2", "q4_0", T.Q4_0)


if __name__ == "__main__":
    main()
