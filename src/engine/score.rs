//! Teacher-forced scoring through the engine: per-token negative
//! log-likelihoods (and logits when asked) of a given token sequence, with
//! the same kernels, chunks and compression schedule as generation.

use crate::engine::config::too_long;
use crate::engine::serve::Engine;
use crate::error::{Error, Result};
use crate::gpu::Op;
use crate::gpu::{GpuBuffer, GpuContext};
use crate::kv::SeqTables;
use crate::kv::paged::PagedKv;
use crate::model::llama::{check_ids, final_norm, push_nll_head};
use crate::ops::nll;

/// Result of teacher-forced scoring.
#[derive(Clone, Debug)]
pub struct ScoreOutput {
    /// NLL of tokens 1..T, each under the logits after the previous token.
    pub nll: Vec<f32>,
    /// `[T, vocab]` logits after each token, when asked for.
    pub logits: Option<Vec<f32>>,
}

impl Engine<'_> {
    /// Teacher-forced scoring through the paged cache,
    /// the first `prefill` tokens as one prefill (in chunks), then one decode
    /// step per token. Needs an idle engine.
    pub fn score(
        &mut self,
        tokens: &[u32],
        prefill: usize,
        want_logits: bool,
    ) -> Result<ScoreOutput> {
        let t = tokens.len();
        check_score_args(t, prefill)?;
        if self.sched.has_work() {
            return Err(Error::invalid("score", "the engine is serving requests"));
        }
        if t > self.capacity {
            return Err(too_long(&self.cfg, t, self.capacity));
        }
        check_ids(&self.cfg, tokens)?;
        let (v, h) = (self.cfg.vocab_size, self.acts.head_rows);
        let targets = GpuBuffer::from_slice(self.ctx, "score.targets", &score_targets(tokens))?;
        let nll_out = GpuBuffer::<f32>::zeros(self.ctx, "score.nll", t)?;
        let mut logits = want_logits.then(|| Vec::with_capacity(t * v));
        // An idle engine has every lane free.
        let Some(lane) = self.sched.take_lane() else {
            return Err(Error::invalid("score", "no free lane"));
        };
        let mut tables = self.kv.new_tables();
        let result = (|| -> Result<()> {
            if let Some(c) = &self.compressor {
                c.reset_lane(self.ctx, lane)?;
                c.set_lanes(self.ctx, &[lane as u32])?;
            }
            let grow = |tables: &mut SeqTables,
                        n: usize,
                        kv: &mut PagedKv,
                        ctx: &GpuContext|
             -> Result<()> {
                let new = tables.append(n, &mut kv.alloc).map_err(|_| {
                    Error::invalid(
                        "--kv-pool-mb",
                        format!("the pool cannot hold {t} tokens for scoring"),
                    )
                })?;
                kv.write_pages(ctx, lane, &new)
            };
            for start in (0..prefill).step_by(self.config.prefill_chunk) {
                let n = self.config.prefill_chunk.min(prefill - start);
                grow(&mut tables, n, &mut self.kv, self.ctx)?;
                for (i, p) in self.pos_host[..n].iter_mut().enumerate() {
                    *p = (start + i) as u32;
                }
                self.acts
                    .write_inputs(self.ctx, &tokens[start..start + n], &self.pos_host[..n])?;
                self.kv.set_row(0, lane, &tables, None);
                self.kv.upload_rows(self.ctx)?;
                let body = self.prefill_ops(n, 0, start + n)?;
                let norm = final_norm(self.ctx, &self.weights, &self.acts, 0, n)?;
                self.ctx.run_ops(
                    "kvsift.score.prefill",
                    &[&body, std::slice::from_ref(&norm)],
                )?;
                for r0 in (0..n).step_by(h) {
                    let rows = h.min(n - r0);
                    let mut head = vec![];
                    push_nll_head(
                        &mut head,
                        self.ctx,
                        &self.weights,
                        &self.acts,
                        &targets,
                        &nll_out,
                        r0,
                        rows,
                        start + r0,
                    )?;
                    self.ctx.run_ops("kvsift.score.head", &[&head])?;
                    if let Some(l) = logits.as_mut() {
                        l.extend(self.acts.logits.read_range(self.ctx, 0, rows * v)?);
                    }
                }
            }
            let cfg = self.config.compression.clone();
            if self.compressor.is_some() && cfg.compresses_after_prefill(prefill) {
                self.compress(lane, &mut tables, &cfg)?;
            }
            if prefill < t {
                let mut head = vec![final_norm(self.ctx, &self.weights, &self.acts, 0, 1)?];
                push_nll_head(
                    &mut head,
                    self.ctx,
                    &self.weights,
                    &self.acts,
                    &targets,
                    &nll_out,
                    0,
                    1,
                    0,
                )?;
                let body = self.decode_body(1)?;
                for (i, &tok) in tokens[prefill..].iter().enumerate() {
                    let row = prefill + i;
                    grow(&mut tables, 1, &mut self.kv, self.ctx)?;
                    self.acts.write_inputs(self.ctx, &[tok], &[row as u32])?;
                    self.kv.set_row(0, lane, &tables, None);
                    self.kv.upload_rows(self.ctx)?;
                    set_nll_row(self.ctx, &head, v, row)?;
                    self.ctx.run_ops("kvsift.score.decode", &[&body, &head])?;
                    if let Some(l) = logits.as_mut() {
                        l.extend(self.acts.logits.read_range(self.ctx, 0, v)?);
                    }
                    if self.compressor.is_some() && cfg.compresses_after_decode(row) {
                        self.compress(lane, &mut tables, &cfg)?;
                    }
                }
            }
            Ok(())
        })();
        self.note_peak();
        tables.release(&mut self.kv.alloc);
        self.sched.return_lane(lane);
        result?;
        let nll = nll_out.read_range(self.ctx, 0, t)?;
        Ok(ScoreOutput {
            nll: nll[..t - 1].to_vec(),
            logits,
        })
    }
}

/// Validates the scoring arguments (user errors, naming the flag).
fn check_score_args(t: usize, prefill: usize) -> Result<()> {
    if t < 2 {
        return Err(Error::invalid(
            "tokens",
            format!("scoring needs at least 2 tokens, got {t}"),
        ));
    }
    if prefill == 0 || prefill > t {
        return Err(Error::invalid(
            "--prefill",
            format!("{prefill}: must be between 1 and the token count {t}"),
        ));
    }
    Ok(())
}

/// Token i+1 is scored under the logits after token i (the last row has no target).
fn score_targets(tokens: &[u32]) -> Vec<u32> {
    let mut targets: Vec<u32> = tokens[1..].to_vec();
    targets.push(0);
    targets
}

/// Points the nll dispatch at the end of `head` at row `row` of the targets.
fn set_nll_row(ctx: &GpuContext, head: &[Op], vocab: usize, row: usize) -> Result<()> {
    match head.last() {
        Some(Op::Dispatch(d)) => d.write_params(
            ctx,
            &nll::NllParams {
                rows: 1,
                n: vocab as u32,
                row_offset: row as u32,
            },
        ),
        _ => Err(Error::invalid(
            "scoring head",
            "does not end with the nll dispatch",
        )),
    }
}
