//! The op lists the executor submits: a prefill chunk's body, a decode
//! step for `b` rows (built once per batch size and replayed), `k` chained
//! decode steps. Built from the model's layer body (`model::llama::body`)
//! with the paged attention kernels and what the compressor records.

use crate::engine::serve::{Engine, MAX_PREFILL_SPLITS};
use crate::error::Result;
use crate::gpu::Op;
use crate::model::config::ModelConfig;
use crate::model::llama::{Activations, body, push_norm_lm_head};
use crate::ops::paged_attention::{
    QkvRows, paged_decode, paged_kv_store, paged_prefill, prefill_splits,
};

impl Engine<'_> {
    /// The body of a prefill chunk of `n` tokens of the sequence in step row
    /// `row`, whose heads hold `len` slots with the chunk.
    pub(super) fn prefill_ops(&self, n: usize, row: usize, len: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let mut attend = |l: usize, ops: &mut Vec<Op>| -> Result<()> {
            let mut kv = self.kv.layer(l);
            kv.desc_base += row * kv.n_heads;
            let q = qkv_rows(cfg, a);
            ops.push(paged_kv_store(ctx, &kv, &q, n, n)?.into());
            let splits = prefill_splits(len, kv.layout.page_size, MAX_PREFILL_SPLITS);
            ops.extend(
                paged_prefill(
                    ctx,
                    &kv,
                    &q,
                    n,
                    self.weights.layers[l].window,
                    splits,
                    &self.partials,
                    &a.attn,
                )?
                .into_iter()
                .map(Op::from),
            );
            if let Some(c) = &self.compressor {
                ops.extend(c.forward_ops(
                    ctx,
                    &kv,
                    &a.positions,
                    &a.qkv,
                    cfg.qkv_dim(),
                    l,
                    n,
                    n,
                    len,
                )?);
            }
            Ok(())
        };
        body(ctx, &self.weights, a, n, &mut attend)
    }

    /// The body of a decode step for `b` rows (one token each, rows set with
    /// `PagedKv::set_row`).
    pub(super) fn decode_body(&self, b: usize) -> Result<Vec<Op>> {
        let (ctx, cfg, a) = (self.ctx, &self.cfg, &self.acts);
        let mut attend = |l: usize, ops: &mut Vec<Op>| -> Result<()> {
            let kv = self.kv.layer(l);
            let q = qkv_rows(cfg, a);
            ops.push(paged_kv_store(ctx, &kv, &q, b, 1)?.into());
            let window = self.weights.layers[l].window;
            let pair = paged_decode(
                ctx,
                &kv,
                &q,
                b,
                window,
                self.n_splits,
                self.split_pages,
                &self.partials,
                &a.attn,
            )?;
            ops.extend(pair.into_iter().map(Op::from));
            if let Some(c) = &self.compressor {
                ops.extend(c.forward_ops(
                    ctx,
                    &kv,
                    &a.positions,
                    &a.qkv,
                    cfg.qkv_dim(),
                    l,
                    b,
                    1,
                    self.capacity,
                )?);
            }
            Ok(())
        };
        body(ctx, &self.weights, a, b, &mut attend)
    }

    /// Builds (once) the decode step for `b` rows: body, final norm, lm_head
    /// over the batch and sampling into `tokens_out`.
    pub(super) fn ensure_decode_plan(&mut self, b: usize) -> Result<()> {
        if !self.decode_plans.contains_key(&b) {
            let (ctx, a) = (self.ctx, &self.acts);
            let mut ops = self.decode_body(b)?;
            push_norm_lm_head(&mut ops, ctx, &self.weights, a, b)?;
            ops.push(
                self.sampler
                    .dispatch(ctx, b, &a.logits, &self.seen, &self.tokens_out)?
                    .into(),
            );
            self.decode_plans.insert(b, ops);
        }
        Ok(())
    }

    /// Builds (once) `k` chained decode steps of `b` rows: before step j its
    /// staged positions, RoPE rows, descriptors and sampling rows are copied
    /// in (and, after the first, the previous step's tokens become the ids);
    /// after it, its tokens go to slot j of the readback.
    pub(super) fn ensure_chain_plan(&mut self, b: usize, k: usize) -> Result<()> {
        self.ensure_decode_plan(b)?;
        if !self.chain_plans.contains_key(&(b, k)) {
            let step = &self.decode_plans[&b];
            let mut ops = Vec::with_capacity(k * (step.len() + 6));
            for j in 0..k {
                if j > 0 {
                    ops.push(self.tokens_out.copy_op(0, &self.acts.ids, 0, b)?);
                }
                self.acts.push_staged(&mut ops, j, b)?;
                ops.push(self.kv.staged_rows_op(j)?);
                ops.push(self.sampler.staged_rows_op(j, b)?);
                ops.extend(step.iter().cloned());
                ops.push(self.token_slot.copy_from_to(
                    self.tokens_out.raw(),
                    0,
                    (b * 4) as u64,
                    (j * b * 4) as u64,
                )?);
            }
            self.chain_plans.insert((b, k), ops);
        }
        Ok(())
    }
}

fn qkv_rows<'a>(cfg: &ModelConfig, a: &'a Activations) -> QkvRows<'a> {
    QkvRows {
        positions: &a.positions,
        qkv: &a.qkv,
        qkv_stride: cfg.qkv_dim(),
        n_q_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
    }
}
