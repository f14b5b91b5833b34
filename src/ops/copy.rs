//! Buffer copy (`shaders/copy.wgsl`), 16 bytes per invocation: the device
//! bandwidth probe behind `kvsift bench roofline`.

use bytemuck::{Pod, Zeroable};

use super::ensure;
use super::host_layout;
use super::{NO_FEATURES, u32_of};
use crate::error::Result;
use crate::gpu::{Dispatch, GpuBuffer, GpuContext, Kernel};

pub static COPY: Kernel = Kernel {
    name: "copy",
    sources: &[include_str!("../../shaders/copy.wgsl")],
    entries: &["copy_vec4"],
    needs: NO_FEATURES,
};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
}

/// `dst[..4 n] = src[..4 n]` (u32 words, `n` groups of four).
pub fn copy_vec4(
    ctx: &GpuContext,
    n: usize,
    src: &GpuBuffer<u32>,
    dst: &GpuBuffer<u32>,
) -> Result<Dispatch> {
    ensure!(
        src.len() >= 4 * n && dst.len() >= 4 * n,
        "copy_vec4: {n} vec4s, src {} words, dst {}",
        src.len(),
        dst.len()
    );
    let pipeline = ctx.pipeline(&COPY, "copy_vec4", &super::wg_constants())?;
    Dispatch::with_params(
        ctx,
        pipeline,
        "kvsift.copy_vec4".into(),
        &Params { n: u32_of("n", n)? },
        &[src.binding(), dst.binding()],
        ctx.grid(super::blocks(n)?),
    )
}

/// CPU twin.
pub fn copy_cpu(dst: &mut [u32], src: &[u32]) {
    dst.copy_from_slice(&src[..dst.len()]);
}

/// The structs this module's kernels read (checked against the WGSL in
/// tests/shader_portability.rs).
pub(crate) fn host_layouts() -> Vec<super::HostLayout> {
    vec![host_layout!(Params in [&COPY] as "Params" { n })]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Rng, gpu};

    #[test]
    fn copy_matches_twin_exactly() {
        let Some(ctx) = gpu() else { return };
        let mut rng = Rng::new(3);
        // 1 vec4, a non-multiple of the workgroup, several workgroups.
        for n in [1usize, 300, 5000] {
            let src: Vec<u32> = (0..4 * n + 3).map(|_| rng.next_u64() as u32).collect();
            let g_src = GpuBuffer::from_slice(ctx, "src", &src).unwrap();
            let g_dst = GpuBuffer::<u32>::zeros(ctx, "dst", 4 * n + 3).unwrap();
            ctx.run("test", &[&copy_vec4(ctx, n, &g_src, &g_dst).unwrap()])
                .unwrap();
            let mut want = vec![0u32; 4 * n + 3];
            copy_cpu(&mut want[..4 * n], &src);
            assert_eq!(g_dst.read(ctx).unwrap(), want, "n = {n}");
        }
    }
}
