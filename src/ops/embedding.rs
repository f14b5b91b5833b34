//! Token-embedding gather (`shaders/embedding.wgsl`): `out[t, :] = table[ids[t], :]`,
//! one dispatch per row-part of the table (vocab x hidden tables often exceed
//! one storage binding: Qwen2's 151936 x 1536 is 445 MiB in f16).

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, GpuMatrix, Kernel};

pub static EMBEDDING: Kernel = Kernel {
    name: "embedding",
    sources: &[
        super::quant::QUANT_BLOCKS,
        include_str!("../../shaders/embedding.wgsl"),
    ],
    entries: &[
        "embed_f32",
        "embed_f16",
        "embed_q8_0",
        "embed_q4_0",
        "embed_q4_k",
        "embed_q6_k",
    ],
    needs: NO_FEATURES,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n_tokens: u32,
    dim: u32,
    row_words: u32,
    first_row: u32,
    part_rows: u32,
}

/// Token ids must index the table; a bad id is the caller's (user's) error.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::invalid(
            "token id",
            format!("{id} is outside the vocabulary of {vocab} tokens"),
        )),
        None => Ok(()),
    }
}

/// Gathers `n_tokens` rows of `table` by `ids` into `out` (`[n_tokens, table.cols]`).
pub fn embed(
    ctx: &GpuContext,
    n_tokens: usize,
    table: &GpuMatrix,
    ids: &GpuBuffer<u32>,
    out: &GpuBuffer<f32>,
) -> Result<Vec<Dispatch>> {
    ensure!(
        ids.len() >= n_tokens && out.len() >= n_tokens * table.cols,
        "embed {}: {n_tokens} tokens, ids {}, out {} for dim {}",
        table.label,
        ids.len(),
        out.len(),
        table.cols
    );
    table
        .parts
        .iter()
        .map(|part| {
            let entry = format!("embed_{}", part.dtype.entry_suffix());
            let pipeline = ctx.pipeline(&EMBEDDING, &entry, &super::wg_constants())?;
            let params = Params {
                n_tokens: u32_of("tokens", n_tokens)?,
                dim: u32_of("dim", table.cols)?,
                row_words: u32_of("row words", part.dtype.row_stride(table.cols))?,
                first_row: u32_of("first row", part.first_row)?,
                part_rows: u32_of("part rows", part.rows)?,
            };
            let label = format!("kvsift.embed.{}", table.label);
            Dispatch::with_params(
                ctx,
                pipeline,
                label,
                &params,
                &[
                    part.buffer.as_entire_binding(),
                    ids.binding(),
                    out.binding(),
                ],
                ctx.grid(super::blocks(n_tokens * table.cols)?),
            )
        })
        .collect()
}

/// CPU twin: `table` holds the stored values (see [`WeightDtype::round`]).
pub fn embed_cpu(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * dim..(id as usize + 1) * dim]
                .iter()
                .copied()
        })
        .collect()
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![
        host_layout!(Params in [&EMBEDDING] as "Params" { n_tokens, dim, row_words, first_row, part_rows }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;
    use crate::gpu::{QuantFormat, WeightDtype};
    use crate::testing::{Rng, gpu, random_quant_matrix};

    fn check(
        ctx: &GpuContext,
        seed: u64,
        vocab: usize,
        dim: usize,
        n_tokens: usize,
        dtype: WeightDtype,
    ) -> usize {
        let mut rng = Rng::new(seed);
        let (tm, stored) = match dtype.quant() {
            Some(f) => random_quant_matrix(ctx, f, vocab, dim, &mut rng),
            None => {
                let table = rng.normals(vocab * dim);
                let tm = GpuMatrix::upload(ctx, "embed", vocab, dim, dtype, &table).unwrap();
                (tm, table.iter().map(|v| dtype.round(*v)).collect())
            }
        };
        let ids: Vec<u32> = (0..n_tokens).map(|_| rng.below(vocab) as u32).collect();
        check_ids(&ids, vocab).unwrap();
        let ib = GpuBuffer::from_slice(ctx, "ids", &ids).unwrap();
        let out = GpuBuffer::<f32>::zeros(ctx, "out", n_tokens * dim).unwrap();
        let ds = embed(ctx, n_tokens, &tm, &ib, &out).unwrap();
        ctx.run("test", &ds.iter().collect::<Vec<_>>()).unwrap();
        let want = embed_cpu(&stored, dim, &ids);
        let got = out.read(ctx).unwrap();
        // A gather copies bits, and dequantizing forms dequantize's products
        // in its order: exact.
        if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
            panic!(
                "embed {dtype:?} [{vocab}, {dim}] x {n_tokens}: first mismatch at {i}: got {}, want {}",
                got[i], want[i]
            );
        }
        tm.parts.len()
    }

    #[test]
    fn embedding_matches_twin() {
        let Some(ctx) = gpu() else { return };
        for (i, &(vocab, dim, n)) in [
            (1, 1, 1),
            (10, 7, 3),
            (300, 64, 17),
            (1000, 128, 5),
            (50, 896, 300),
        ]
        .iter()
        .enumerate()
        {
            for dtype in [WeightDtype::F32, WeightDtype::F16] {
                check(ctx, 130 + i as u64, vocab, dim, n, dtype);
            }
        }
        // Quantized tables: rows of whole blocks.
        for (i, &(vocab, dim, n)) in [(1, 256, 1), (10, 256, 3), (300, 512, 17)]
            .iter()
            .enumerate()
        {
            for f in QuantFormat::ALL {
                check(ctx, 150 + i as u64, vocab, dim, n, WeightDtype::Quant(f));
            }
        }
        check(ctx, 160, 77, 96, 9, WeightDtype::Q8_0);
        check(ctx, 161, 77, 32, 9, WeightDtype::Q4_0);
    }

    #[test]
    fn split_tables_gather_from_every_part() {
        if gpu().is_none() {
            return;
        }
        let opts = GpuOptions {
            max_binding_bytes: Some(2048),
            ..GpuOptions::from_env().unwrap()
        };
        let ctx = GpuContext::new(&opts).unwrap();
        assert!(check(&ctx, 140, 97, 33, 40, WeightDtype::F32) >= 6);
        assert!(check(&ctx, 141, 97, 33, 40, WeightDtype::F16) >= 3);
        // 60 q8_0 rows of 34 bytes per 2048-byte part (odd rows start mid-word).
        assert!(check(&ctx, 142, 97, 32, 40, WeightDtype::Q8_0) >= 2);
        assert!(check(&ctx, 143, 20, 256, 40, WeightDtype::Quant(QuantFormat::Q6K)) >= 2);
    }

    #[test]
    fn ids_outside_the_vocabulary_are_an_error() {
        let e = check_ids(&[1, 2, 50], 50).unwrap_err().to_string();
        assert!(e.contains("50") && e.contains("vocabulary"), "{e}");
    }
}
