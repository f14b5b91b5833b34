// quant_blocks.wgsl: reading llama.cpp's quantized blocks (src/ops/quant.rs
// has the layouts and the CPU twins) out of `w: array<u32>`, which every
// shader joined after this one declares (binding 1). Blocks are not
// word-sized: a row starts at an even byte, and each block's bytes are
// gathered from the words that hold them (no 8- or 16-bit storage).
//   q8_0: 34-byte blocks of 32 weights: f16 d, 32 int8 q;     w = d * q
//   q4_0: 18-byte blocks of 32 weights: f16 d, 16 nibble bytes (low nibbles
//         weights 0-15, high 16-31);                          w = d * (q - 8)
//   q4_K: 144-byte super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit
//         scales and mins, 128 nibble bytes;                  w = d*sc*q - dmin*m
//   q6_K: 210-byte super-blocks of 256: 128 bytes of low nibbles, 64 of
//         2-bit highs, 16 int8 scales, f16 d;                 w = d*sc*(q - 32)

const Q8_0: u32 = 0u;
const Q4_0: u32 = 1u;
const Q4_K: u32 = 2u;
const Q6_K: u32 = 3u;

// The 4 bytes at byte offset `at` (even), as one little-endian word.
fn word_at(at: u32) -> u32 {
    let i = at >> 2u;
    if (at & 3u) == 0u {
        return w[i];
    }
    return (w[i] >> 16u) | (w[i + 1u] << 16u);
}

// The f16 at byte offset `at` (even).
fn half_at(at: u32) -> f32 {
    let word = w[at >> 2u];
    let bits = select(word & 0xffffu, word >> 16u, (at & 2u) != 0u);
    return unpack2x16float(bits).x;
}

// The byte at offset `at`.
fn byte_at(at: u32) -> u32 {
    return (w[at >> 2u] >> ((at & 3u) * 8u)) & 0xffu;
}

fn i8_at(at: u32) -> f32 {
    return f32(bitcast<i32>(byte_at(at) << 24u) >> 24u);
}

// The four int8 of a word, in byte order.
fn i8x4(u: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(bitcast<i32>(u << 24u) >> 24u),
        f32(bitcast<i32>(u << 16u) >> 24u),
        f32(bitcast<i32>(u << 8u) >> 24u),
        f32(bitcast<i32>(u) >> 24u),
    );
}

// The four nibbles (low, or high with shift 4) of a word, minus 8.
fn nibbles(u: u32, shift: u32) -> vec4<f32> {
    let q = (u >> shift) & 0x0f0f0f0fu;
    return vec4<f32>(
        f32(q & 0xffu),
        f32((q >> 8u) & 0xffu),
        f32((q >> 16u) & 0xffu),
        f32(q >> 24u),
    ) - vec4<f32>(8.0);
}

// The four bytes of a word.
fn bytes4(u: u32) -> vec4<u32> {
    return vec4<u32>(u & 0xffu, (u >> 8u) & 0xffu, (u >> 16u) & 0xffu, u >> 24u);
}

// q4_K sub-block j's 6-bit scale and min, from the 12 scale bytes at `at`
// (llama.cpp's get_scale_min_k4).
fn scale_min_k4(at: u32, j: u32) -> vec2<f32> {
    if j < 4u {
        return vec2<f32>(f32(byte_at(at + j) & 63u), f32(byte_at(at + j + 4u) & 63u));
    }
    let sc = (byte_at(at + j + 4u) & 0xfu) | ((byte_at(at + j - 4u) >> 6u) << 4u);
    let m = (byte_at(at + j + 4u) >> 4u) | ((byte_at(at + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Units in a row of `cols` weights (a unit: the weights one u32 word of
// quantized values holds; the decode matvecs hand out rows by units).
fn row_units(format: u32, cols: u32) -> u32 {
    switch format {
        case 0u: { return cols / 4u; }
        case 1u: { return cols / 8u; }
        case 2u: { return cols / 8u; }
        default: { return cols / 16u; }
    }
}

// Weight k of the row whose blocks start at byte `row`, one at a time (the
// prefill matmul's tile loads and the embedding gather; the decode matvec
// reads whole words of blocks instead). Products in dequantize_row_*'s order.
fn weight_q8_0(row: u32, k: u32) -> f32 {
    let at = row + 34u * (k / 32u);
    return half_at(at) * i8_at(at + 2u + k % 32u);
}

fn weight_q4_0(row: u32, k: u32) -> f32 {
    let at = row + 18u * (k / 32u);
    let j = k % 32u;
    let q = (byte_at(at + 2u + j % 16u) >> (4u * (j / 16u))) & 0xfu;
    return half_at(at) * (f32(q) - 8.0);
}

fn weight_q4_k(row: u32, k: u32) -> f32 {
    let at = row + 144u * (k / 256u);
    let i = k % 256u;
    let pair = i / 64u;
    let high = (i % 64u) / 32u;
    let sm = scale_min_k4(at + 4u, 2u * pair + high);
    let q = (byte_at(at + 16u + 32u * pair + i % 32u) >> (4u * high)) & 0xfu;
    return half_at(at) * sm.x * f32(q) - half_at(at + 2u) * sm.y;
}

fn weight_q6_k(row: u32, k: u32) -> f32 {
    let at = row + 210u * (k / 256u);
    let i = k % 256u;
    let h = i / 128u;
    let quarter = (i % 128u) / 32u;
    let l = i % 32u;
    let low = (byte_at(at + 64u * h + l + 32u * (quarter % 2u)) >> (4u * (quarter / 2u))) & 0xfu;
    let high = (byte_at(at + 128u + 32u * h + l) >> (2u * quarter)) & 3u;
    let q = f32(low | (high << 4u)) - 32.0;
    return half_at(at + 208u) * i8_at(at + 192u + 8u * h + l / 16u + 2u * quarter) * q;
}

fn weight_at(format: u32, row: u32, k: u32) -> f32 {
    switch format {
        case 0u: { return weight_q8_0(row, k); }
        case 1u: { return weight_q4_0(row, k); }
        case 2u: { return weight_q4_k(row, k); }
        default: { return weight_q6_k(row, k); }
    }
}
