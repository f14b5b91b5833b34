//! Residual add in place (`shaders/add.wgsl`): `acc += x`.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static ADD: Kernel = Kernel {
    name: "add",
    sources: &[include_str!("../../shaders/add.wgsl")],
    entries: &["add_inplace"],
    needs: NO_FEATURES,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
}

/// `acc[i] += x[i]` for `i < n`.
pub fn add_inplace(
    ctx: &GpuContext,
    n: usize,
    x: &GpuBuffer<f32>,
    acc: &GpuBuffer<f32>,
) -> Result<Dispatch> {
    ensure!(
        x.len() >= n && acc.len() >= n,
        "add_inplace: n {n}, x {}, acc {}",
        x.len(),
        acc.len()
    );
    let pipeline = ctx.pipeline(&ADD, "add_inplace", &super::wg_constants())?;
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.add_inplace".into(),
        &Params { n: u32_of("n", n)? },
        &[x.binding(), acc.binding()],
        ctx.grid(super::blocks(n)?),
    )
}

/// CPU twin.
pub fn add_cpu(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += *b;
    }
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![host_layout!(Params in [&ADD] as "Params" { n })]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, gpu};

    #[test]
    fn add_matches_twin_exactly() {
        let Some(ctx) = gpu() else { return };
        for (i, n) in [1usize, 64, 128, 255, 257, 5000].into_iter().enumerate() {
            let mut rng = Rng::new(90 + i as u64);
            let (x, acc) = (rng.normals(n), rng.normals(n));
            let xb = GpuBuffer::from_slice(ctx, "x", &x).unwrap();
            let ab = GpuBuffer::from_slice(ctx, "acc", &acc).unwrap();
            let d = add_inplace(ctx, n, &xb, &ab).unwrap();
            ctx.run("test", &[&d]).unwrap();
            let mut want = acc.clone();
            add_cpu(&mut want, &x);
            // One f32 add per element: bit-identical.
            let got = ab.read(ctx).unwrap();
            if let Some(j) = (0..n).find(|&j| got[j] != want[j]) {
                panic!(
                    "add n={n}: first mismatch at {j}: got {}, want {}",
                    got[j], want[j]
                );
            }
        }
    }
}
