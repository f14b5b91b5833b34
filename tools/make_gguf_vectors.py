#!/usr/bin/env python3
"""Writes tests/data/gguf/sample.gguf with the `gguf` package (llama.cpp's own
Python writer) and sample.json, what the file holds as that package states
it: every metadata value type, and tensors of every type kvsift reads, with
their dequantized values (gguf.quants.dequantize) and, for q8_0 and q4_0,
the float rows they were quantized from (gguf.quants.quantize: llama.cpp's
reference quantizers, bit for bit).

    pip install gguf numpy && python3 tools/make_gguf_vectors.py
"""
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "gguf")
os.makedirs(out, exist_ok=True)
path = os.path.join(out, "sample.gguf")
rng = np.random.default_rng(17)

w = gguf.GGUFWriter(path, arch="llama")
meta = {
    "test.u8": (200, V.UINT8), "test.i8": (-100, V.INT8), "test.u16": (60000, V.UINT16),
    "test.i16": (-30000, V.INT16), "test.u32": (4000000000, V.UINT32), "test.i32": (-2000000000, V.INT32),
    "test.f32": (0.15625, V.FLOAT32), "test.bool": (True, V.BOOL), "test.string": ("naïve ☃ text", V.STRING),
    "test.u64": (2**63 + 5, V.UINT64), "test.i64": (-(2**62), V.INT64), "test.f64": (1e-300, V.FLOAT64),
}
for k, (v, t) in meta.items():
    w.add_key_value(k, v, t)
w.add_array("test.array_i32", [1, -2, 3])
w.add_array("test.array_str", ["a", "", "ccc"])

tensors = {}
def add(name, rows, cols, qtype):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    # A few exact zeros and a zero block, which quantizers treat specially.
    x[0, :32] = 0.0
    x[-1, 3] = 0.0
    if qtype in (T.F32,):
        data = x
    elif qtype == T.F16:
        data = x.astype(np.float16)
    else:
        data = gguf.quants.quantize(x, qtype)
    w.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    deq = gguf.quants.dequantize(data, qtype).reshape(rows, cols)
    raw = np.ascontiguousarray(data).tobytes()
    tensors[name] = {
        "type": qtype.name.lower(), "dims": [cols, rows], "hex": raw.hex(),
        "bytes": len(raw), "source": x.flatten().tolist() if qtype in (T.Q8_0, T.Q4_0) else None,
        "dequantized": deq.astype(np.float32).flatten().tolist(),
    }

add("f32.weight", 3, 5, T.F32)
add("f16.weight", 2, 7, T.F16)
add("q8_0.weight", 3, 64, T.Q8_0)
add("q4_0.weight", 3, 96, T.Q4_0)
# K-quants: the package only dequantizes them; random blocks with sane scales.
for name, qtype, size in [("q4_k.weight", T.Q4_K, 144), ("q6_k.weight", T.Q6_K, 210)]:
    rows = 2
    blocks = rng.integers(0, 256, size=(rows, size), dtype=np.uint8)
    # Keep the f16 scales finite and small: d (and dmin) bytes from modest floats.
    if qtype == T.Q4_K:
        blocks[:, 0:4] = np.array([0.01, 0.005], dtype=np.float16).view(np.uint8)
    else:
        blocks[:, 208:210] = np.array([0.02], dtype=np.float16).view(np.uint8)
    w.add_tensor(name, blocks, raw_dtype=qtype)
    deq = gguf.quants.dequantize(blocks, qtype).reshape(rows, 256)
    raw = blocks.tobytes()
    tensors[name] = {"type": qtype.name.lower(), "dims": [256, rows], "hex": raw.hex(),
                     "bytes": len(raw), "source": None, "dequantized": deq.astype(np.float32).flatten().tolist()}

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

with open(os.path.join(out, "sample.json"), "w") as f:
    json.dump({
        "metadata": {k: v for k, (v, _) in meta.items()} | {
            "test.array_i32": [1, -2, 3], "test.array_str": ["a", "", "ccc"], "general.architecture": "llama"},
        "tensors": tensors,
    }, f, indent=0)
print(path, os.path.getsize(path), "bytes")
