//! `kvsift select`: which slots a method keeps, from captured tensors
//! (`keys` f32 [Hkv, T, D], `queries` f32 [Hq, W, D]; all T queries for H2O v3).
//! Prints `{"kept": [[slot, ...], ...]}`, one list per stored head, ascending
//! (R-KV with --slot-order reference: in the reference layout order).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use kvsift::kv::compression::{Captured, Method, SlotOrder, gpu, select_cpu};
use safetensors::SafeTensors;

use super::compress::CompressArgs;

#[derive(Args, Debug)]
pub struct SelectArgs {
    /// Method (same values as --kv of generate).
    #[arg(long, value_parser = super::compress::method_parser())]
    pub method: Method,
    /// safetensors file with `keys` and `queries`.
    #[arg(long)]
    pub input: PathBuf,
    /// Layer index (PyramidKV).
    #[arg(long, default_value_t = 0)]
    pub layer: usize,
    /// Layers of the model (PyramidKV).
    #[arg(long, default_value_t = 1)]
    pub num_layers: usize,
    /// Run the CPU reference selection instead of the GPU kernels.
    #[arg(long)]
    pub cpu: bool,
    #[command(flatten)]
    pub flags: CompressArgs,
}

fn tensor(
    st: &SafeTensors,
    path: &std::path::Path,
    name: &str,
) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let t = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}: no tensor {name:?}", path.display()))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 3 {
        anyhow::bail!(
            "{}: tensor {name:?} must be f32 with 3 dimensions, is {:?} {:?}",
            path.display(),
            t.dtype(),
            t.shape()
        );
    }
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((t.shape().to_vec(), data))
}

pub fn run(mut a: SelectArgs) -> anyhow::Result<()> {
    a.flags.kv = a.method;
    let cfg = a.flags.config()?;
    if !cfg.method.policy().compresses() {
        anyhow::bail!("--method none selects nothing; pick a compression method");
    }
    if a.num_layers == 0 || a.layer >= a.num_layers {
        anyhow::bail!(
            "--layer {} must be below --num-layers {}",
            a.layer,
            a.num_layers
        );
    }
    let bytes =
        std::fs::read(&a.input).map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", a.input.display()))?;
    let (ks, keys) = tensor(&st, &a.input, "keys")?;
    let (qs, queries) = tensor(&st, &a.input, "queries")?;
    if ks[2] != qs[2] {
        anyhow::bail!(
            "{}: keys have head dim {}, queries {}",
            a.input.display(),
            ks[2],
            qs[2]
        );
    }
    let x = Captured {
        keys: &keys,
        queries: &queries,
        hkv: ks[0],
        hq: qs[0],
        t: ks[1],
        q_rows: qs[1],
        d: ks[2],
    };
    let sel = if a.cpu {
        select_cpu(&cfg, &x, a.layer, a.num_layers)?
    } else {
        let ctx = kvsift::gpu::GpuContext::from_env()?;
        gpu::select_gpu(&ctx, &cfg, &x, a.layer, a.num_layers)?
    };
    let kept = match (cfg.slot_order, sel.reference) {
        (SlotOrder::Reference, Some(r)) => r,
        _ => sel.kept,
    };
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::json!({ "kept": kept })
    )?;
    Ok(())
}
