//! One step of the model as a list of ops: the per-step working buffers
//! ([`Activations`]), the layer body (the caller supplies each layer's
//! store-and-attend ops) and the heads (final norm, lm_head, sampling or NLL).

use super::*;

/// Per-step working buffers for up to `rows` tokens, and the host-side
/// staging of a step's inputs (ids, positions, RoPE rows).
pub struct Activations {
    pub rows: usize,
    pub ids: GpuBuffer<u32>,
    pub positions: GpuBuffer<u32>,
    pub cos: GpuBuffer<f32>,
    pub sin: GpuBuffer<f32>,
    pub hidden: GpuBuffer<f32>,
    pub normed: GpuBuffer<f32>,
    pub qkv: GpuBuffer<f32>,
    pub attn: GpuBuffer<f32>,
    pub gate_up: GpuBuffer<f32>,
    pub act: GpuBuffer<f32>,
    /// Rows the lm_head reads (copied out of `normed`).
    pub head_in: GpuBuffer<f32>,
    /// `[head_rows, vocab]`
    pub logits: GpuBuffer<f32>,
    /// Rows one lm_head pass can produce (logits fit one binding).
    pub head_rows: usize,
    rope_table: RopeTable,
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    /// Chained decode: each step's positions and RoPE rows.
    staged: Option<StagedRows>,
}

/// Inputs of the steps of a chained decode (the ids come from the previous
/// step's sampled tokens on the GPU).
struct StagedRows {
    positions: StagedInput<u32>,
    cos: StagedInput<f32>,
    sin: StagedInput<f32>,
}

impl Activations {
    /// Fails unless the lm_head's buffers hold `rows` rows.
    fn check_head_rows(&self, rows: usize) -> Result<()> {
        if rows > self.head_rows {
            return Err(Error::invalid(
                "lm_head",
                format!("{rows} rows, room for {}", self.head_rows),
            ));
        }
        Ok(())
    }

    /// Buffers for steps of up to `rows` tokens; the lm_head produces up to
    /// `want_head_rows` rows per pass (fewer if a binding cannot hold them).
    pub fn new(
        ctx: &GpuContext,
        cfg: &ModelConfig,
        rows: usize,
        want_head_rows: usize,
    ) -> Result<Self> {
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let half = cfg.head_dim / 2;
        let head_rows =
            (ctx.caps.max_binding_bytes as usize / (v * 4)).clamp(1, want_head_rows.max(1));
        let zeros = |label: &str, dims: &[usize]| -> Result<GpuBuffer<f32>> {
            GpuBuffer::zeros(ctx, label, checked_len(label, dims)?)
        };
        Ok(Self {
            rows,
            ids: GpuBuffer::zeros(ctx, "act.ids", rows)?,
            positions: GpuBuffer::zeros(ctx, "act.positions", rows)?,
            cos: zeros("act.cos", &[rows, half])?,
            sin: zeros("act.sin", &[rows, half])?,
            hidden: zeros("act.hidden", &[rows, h])?,
            normed: zeros("act.normed", &[rows, h])?,
            qkv: zeros("act.qkv", &[rows, cfg.qkv_dim()])?,
            attn: zeros("act.attn", &[rows, cfg.q_dim()])?,
            gate_up: zeros("act.gate_up", &[rows, 2, inter])?,
            act: zeros("act.mlp", &[rows, inter])?,
            head_in: zeros("act.head_in", &[head_rows, h])?,
            logits: zeros("act.logits", &[head_rows, v])?,
            head_rows,
            rope_table: RopeTable::new(&cfg.rope)?,
            cos_host: vec![0.0; rows * half],
            sin_host: vec![0.0; rows * half],
            staged: None,
        })
    }

    /// Room for the inputs of `steps` chained decode steps of up to `rows` tokens.
    pub fn enable_chain(&mut self, ctx: &GpuContext, steps: usize) -> Result<()> {
        let half = self.rope_table.half();
        self.staged = Some(StagedRows {
            positions: StagedInput::new(ctx, "act.staged.positions", steps, self.rows)?,
            cos: StagedInput::new(ctx, "act.staged.cos", steps, self.rows * half)?,
            sin: StagedInput::new(ctx, "act.staged.sin", steps, self.rows * half)?,
        });
        Ok(())
    }

    /// Stages chained step `step`'s positions and their RoPE rows.
    pub fn stage_positions(
        &mut self,
        ctx: &GpuContext,
        step: usize,
        positions: &[u32],
    ) -> Result<()> {
        self.check_rows(positions.len(), positions.len())?;
        let m = self.fill_rope_rows(positions)?;
        let st = self.staged()?;
        st.positions.write(ctx, step, positions)?;
        st.cos.write(ctx, step, &self.cos_host[..m])?;
        st.sin.write(ctx, step, &self.sin_host[..m])
    }

    fn staged(&self) -> Result<&StagedRows> {
        self.staged
            .as_ref()
            .ok_or_else(|| Error::invalid("chained decode", "enable_chain was not called"))
    }

    /// `n` tokens with `positions` positions fit a step of these activations.
    fn check_rows(&self, n: usize, positions: usize) -> Result<()> {
        if n > self.rows || positions != n {
            return Err(Error::invalid(
                "step inputs",
                format!(
                    "{n} tokens, {positions} positions; room for {} rows",
                    self.rows
                ),
            ));
        }
        Ok(())
    }

    /// The RoPE rows of `positions` into the host staging; their length.
    fn fill_rope_rows(&mut self, positions: &[u32]) -> Result<usize> {
        let m = positions.len() * self.rope_table.half();
        self.rope_table
            .fill(positions, &mut self.cos_host[..m], &mut self.sin_host[..m])?;
        Ok(m)
    }

    /// The copies of staged step `step`'s `n` rows into the live inputs.
    pub fn push_staged(&self, ops: &mut Vec<Op>, step: usize, n: usize) -> Result<()> {
        let half = self.rope_table.half();
        let st = self.staged()?;
        ops.push(st.positions.copy_op(step, &self.positions, n)?);
        ops.push(st.cos.copy_op(step, &self.cos, n * half)?);
        ops.push(st.sin.copy_op(step, &self.sin, n * half)?);
        Ok(())
    }

    /// Writes the first step's token ids of a chained decode.
    pub fn write_ids(&self, ctx: &GpuContext, tokens: &[u32]) -> Result<()> {
        self.check_rows(tokens.len(), tokens.len())?;
        self.ids.write(ctx, 0, tokens)
    }

    /// Writes a step's token ids, their absolute positions and RoPE rows.
    /// The caller has checked the ids against the vocabulary.
    pub fn write_inputs(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        positions: &[u32],
    ) -> Result<()> {
        self.check_rows(tokens.len(), positions.len())?;
        let m = self.fill_rope_rows(positions)?;
        self.ids.write(ctx, 0, tokens)?;
        self.positions.write(ctx, 0, positions)?;
        self.cos.write(ctx, 0, &self.cos_host[..m])?;
        self.sin.write(ctx, 0, &self.sin_host[..m])
    }
}

/// The transformer body for `n` tokens: embedding through the last layer,
/// leaving the residual stream in `a.hidden`. `attend(layer, ops)` pushes the
/// ops that store this step's k/v (from `a.qkv`, after RoPE) and write the
/// attention output into `a.attn`.
pub fn body(
    ctx: &GpuContext,
    w: &LlamaWeights,
    a: &Activations,
    n: usize,
    attend: &mut dyn FnMut(usize, &mut Vec<Op>) -> Result<()>,
) -> Result<Vec<Op>> {
    let cfg = &w.cfg;
    a.check_rows(n, n)?;
    let d = cfg.head_dim;
    let mut ops: Vec<Op> = vec![];
    ops.extend(
        embedding::embed(ctx, n, &w.embed, &a.ids, &a.hidden)?
            .into_iter()
            .map(Op::from),
    );
    let qkv_dim = cfg.qkv_dim();
    for (l, layer) in w.layers.iter().enumerate() {
        let input_norm = PreNorm {
            weight: &layer.input_norm,
            eps: cfg.rms_norm_eps,
            scratch: &a.normed,
        };
        let qkv = Linear {
            weights: &layer.qkv,
            bias: layer.qkv_bias.as_ref(),
            x: &a.hidden,
            y: &a.qkv,
            n_vecs: n,
            accumulate: false,
        };
        push_ops(&mut ops, norm_linear(ctx, &input_norm, &qkv)?);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let heads = |heads, offset| NormShape {
                tokens: n,
                heads,
                dim: d,
                token_stride: qkv_dim,
                offset,
                eps: cfg.rms_norm_eps,
            };
            ops.push(rmsnorm_inplace(ctx, &heads(cfg.n_heads, 0), &a.qkv, qn)?.into());
            ops.push(rmsnorm_inplace(ctx, &heads(cfg.n_kv_heads, cfg.q_dim()), &a.qkv, kn)?.into());
        }
        // q and k heads are adjacent in a qkv row: one rotation for both.
        let rope_shape = RopeShape {
            n_tokens: n,
            n_heads: cfg.n_heads + cfg.n_kv_heads,
            head_dim: d,
            token_stride: qkv_dim,
            head_offset: 0,
        };
        ops.push(rope(ctx, rope_shape, &a.cos, &a.sin, &a.qkv)?.into());
        attend(l, &mut ops)?;
        push_linear(
            &mut ops,
            ctx,
            &layer.o,
            layer.o_bias.as_ref(),
            &a.attn,
            &a.hidden,
            n,
            true,
        )?;
        let post_norm = PreNorm {
            weight: &layer.post_norm,
            ..input_norm
        };
        let gate_up = Linear {
            weights: &layer.gate_up,
            bias: layer.gate_up_bias.as_ref(),
            x: &a.hidden,
            y: &a.gate_up,
            n_vecs: n,
            accumulate: false,
        };
        push_ops(&mut ops, norm_linear(ctx, &post_norm, &gate_up)?);
        let down = Linear {
            weights: &layer.down,
            bias: layer.down_bias.as_ref(),
            x: &a.gate_up,
            y: &a.hidden,
            n_vecs: n,
            accumulate: true,
        };
        push_ops(&mut ops, swiglu_linear(ctx, &a.act, &down)?);
    }
    Ok(ops)
}

/// The final norm of `rows` rows of `a.hidden` from `first`, into the same rows of `a.normed`.
pub fn final_norm(
    ctx: &GpuContext,
    w: &LlamaWeights,
    a: &Activations,
    first: usize,
    rows: usize,
) -> Result<Op> {
    let h = w.cfg.hidden_size;
    let shape = NormShape {
        offset: first * h,
        ..NormShape::rows(rows, h, w.cfg.rms_norm_eps)
    };
    Ok(rmsnorm(ctx, &shape, &a.hidden, &w.final_norm, &a.normed)?.into())
}

/// Decode's head: `a.logits[0..rows] = lm_head(final_norm(a.hidden rows
/// 0..rows))`, the norm fused into the projection where [`norm_linear`] can.
pub fn push_norm_lm_head(
    ops: &mut Vec<Op>,
    ctx: &GpuContext,
    w: &LlamaWeights,
    a: &Activations,
    rows: usize,
) -> Result<()> {
    a.check_head_rows(rows)?;
    let norm = PreNorm {
        weight: &w.final_norm,
        eps: w.cfg.rms_norm_eps,
        scratch: &a.normed,
    };
    let head = Linear {
        weights: w.lm_head(),
        bias: None,
        x: &a.hidden,
        y: &a.logits,
        n_vecs: rows,
        accumulate: false,
    };
    push_ops(ops, norm_linear(ctx, &norm, &head)?);
    Ok(())
}

fn push_ops(ops: &mut Vec<Op>, ds: Vec<Dispatch>) {
    ops.extend(ds.into_iter().map(Op::from));
}

/// `a.logits[0..rows] = lm_head(a.normed rows first..first + rows)`, through `a.head_in`.
pub fn push_lm_head(
    ops: &mut Vec<Op>,
    ctx: &GpuContext,
    w: &LlamaWeights,
    a: &Activations,
    first: usize,
    rows: usize,
) -> Result<()> {
    a.check_head_rows(rows)?;
    let h = w.cfg.hidden_size;
    ops.push(copy(&a.normed, first * h, &a.head_in, 0, rows * h));
    push_linear(
        ops,
        ctx,
        w.lm_head(),
        None,
        &a.head_in,
        &a.logits,
        rows,
        false,
    )
}

/// lm_head over `rows` rows of `a.normed` from `first`, then the NLL of
/// `targets[row_offset..]` into `nll[row_offset..]`; the nll dispatch is the
/// last op (the engine's scoring points it at a row).
#[allow(clippy::too_many_arguments)]
pub fn push_nll_head(
    ops: &mut Vec<Op>,
    ctx: &GpuContext,
    w: &LlamaWeights,
    a: &Activations,
    targets: &GpuBuffer<u32>,
    nll_out: &GpuBuffer<f32>,
    first: usize,
    rows: usize,
    row_offset: usize,
) -> Result<()> {
    push_lm_head(ops, ctx, w, a, first, rows)?;
    let v = w.cfg.vocab_size;
    ops.push(crate::ops::nll::nll(ctx, rows, v, &a.logits, targets, nll_out, row_offset)?.into());
    Ok(())
}

pub fn copy(
    src: &GpuBuffer<f32>,
    src_elem: usize,
    dst: &GpuBuffer<f32>,
    dst_elem: usize,
    n: usize,
) -> Op {
    Op::Copy(BufferCopy {
        src: src.raw().clone(),
        src_offset: (src_elem * 4) as u64,
        dst: dst.raw().clone(),
        dst_offset: (dst_elem * 4) as u64,
        size: (n * 4) as u64,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn push_linear(
    ops: &mut Vec<Op>,
    ctx: &GpuContext,
    weights: &GpuMatrix,
    bias: Option<&GpuBuffer<f32>>,
    x: &GpuBuffer<f32>,
    y: &GpuBuffer<f32>,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let linear_args = Linear {
        weights,
        bias,
        x,
        y,
        n_vecs: n,
        accumulate,
    };
    push_ops(ops, linear(ctx, &linear_args)?);
    Ok(())
}
