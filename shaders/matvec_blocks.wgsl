// matvec_blocks.wgsl: what the two subgroup matvec kernels add to
// matvec_common.wgsl (matvec_rows.wgsl, 4-byte loads; matvec_vec4.wgsl,
// 16-byte loads). Each subgroup computes blocks of ROWS rows for NV vectors,
// walks the row blocks with a grid stride, reduces with subgroupAdd and
// writes through `store`.

// Vectors one subgroup serves per pass (a pipeline constant, 1..=MAX_NV:
// the host picks the power of two that covers the batch).
override NV: u32 = 1u;
const MAX_NV: u32 = 8u;

struct Sg {
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) id: u32,
    @builtin(num_subgroups) count: u32,
}

// Vector v0 + j of the block (past the batch's nv vectors: its last one), so
// every per-vector loop runs NV (a constant) times and the compiler can
// unroll it and keep the accumulators in registers (a loop bounded by nv
// indexes them dynamically, which spills them to memory on GPUs); the extra
// sums are never stored.
fn vec_of(v0: u32, j: u32, nv: u32) -> u32 {
    return v0 + min(j, nv - 1u);
}
