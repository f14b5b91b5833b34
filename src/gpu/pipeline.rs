//! Kernels, the pipeline cache, and recorded dispatches.
//!
//! A [`Kernel`] is plain WGSL from `shaders/` (a few files joined in order, e.g.
//! a reduction prelude and a kernel body). Numeric knobs are WGSL `override`
//! constants; a pipeline is cached by (kernel, entry point, constants). A
//! [`Dispatch`] is one recorded kernel launch (pipeline + bind group + grid);
//! a model step is a list of them encoded into one command buffer.

use std::collections::HashMap;
use std::sync::Mutex;

use super::GpuContext;
use super::context::OptionalFeatures;
use crate::error::{Error, Result};

/// One WGSL kernel family.
pub struct Kernel {
    /// `kvsift.<name>` labels every object made from it.
    pub name: &'static str,
    /// Source files, joined in this order.
    pub sources: &'static [&'static str],
    /// Entry points; the portability test translates each.
    pub entries: &'static [&'static str],
    /// Optional device features the WGSL uses.
    pub needs: OptionalFeatures,
}

impl Kernel {
    pub fn source(&self) -> String {
        self.sources.join("\n")
    }
}

/// Cached by (kernel, entry point, override constants as bit patterns).
type PipelineKey = (&'static str, String, Vec<(String, u64)>);

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
}

impl GpuContext {
    /// The compute pipeline for `entry` of `kernel` with these override constants,
    /// built on first use and cached.
    pub fn pipeline(
        &self,
        kernel: &'static Kernel,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        if !kernel.entries.contains(&entry) {
            return Err(Error::invalid(
                format!("kernel {}", kernel.name),
                format!("no entry point {entry}"),
            ));
        }
        self.require(&format!("kernel {}", kernel.name), kernel.needs)?;
        let mut sorted: Vec<(String, u64)> = constants
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_bits()))
            .collect();
        sorted.sort();
        let key = (kernel.name, entry.to_string(), sorted);
        if let Some(p) = self.lock_pipelines().get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(kernel)?;
        let label = format!("kvsift.{}.{entry}", kernel.name);
        let pipeline = self.checked(&label, || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants,
                        // Every kernel writes its workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })?;
        self.lock_pipelines().insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, kernel: &'static Kernel) -> Result<wgpu::ShaderModule> {
        if let Some(m) = self.lock_modules().get(kernel.name) {
            return Ok(m.clone());
        }
        let label = format!("kvsift.{}", kernel.name);
        let source = kernel.source();
        let module = self.checked(&label, || {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&label),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                })
        })?;
        self.lock_modules().insert(kernel.name, module.clone());
        Ok(module)
    }

    fn lock_pipelines(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PipelineKey, wgpu::ComputePipeline>> {
        self.pipelines
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_modules(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, wgpu::ShaderModule>> {
        self.pipelines
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A small uniform buffer holding `params` (one per dispatch, made once).
    pub fn uniform<P: bytemuck::Pod>(&self, label: &str, params: &P) -> Result<wgpu::Buffer> {
        let bytes = bytemuck::bytes_of(params);
        let size = (bytes.len() as u64).div_ceil(16) * 16;
        self.checked(label, || {
            let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.queue.write_buffer(&buffer, 0, bytes);
            buffer
        })
    }

    /// A 1-D grid of `n` workgroups folded into x/y so no dimension exceeds the
    /// device limit. Kernels linearise it as `wg.x + wg.y * num_workgroups.x`
    /// and skip ids past `n`.
    pub fn grid(&self, n: u32) -> [u32; 3] {
        let max = self.caps.max_workgroups_per_dim.max(1);
        if n <= max {
            [n.max(1), 1, 1]
        } else {
            let y = n.div_ceil(max);
            [n.div_ceil(y), y, 1]
        }
    }

    /// Encodes `dispatches` into one compute pass, submits once, and reports any
    /// validation error as `Error::Gpu` naming `label`.
    pub fn run(&self, label: &str, dispatches: &[&Dispatch]) -> Result<wgpu::SubmissionIndex> {
        self.checked(label, || {
            let mut enc = self.encoder(label);
            encode_dispatches(&mut enc, label, dispatches.iter().copied());
            self.queue.submit([enc.finish()])
        })
    }

    /// Encodes a step (dispatches and buffer copies, in order; given as
    /// segments, e.g. a cached body and a head) into one command buffer and
    /// submits it once.
    pub fn run_ops(&self, label: &str, segments: &[&[Op]]) -> Result<wgpu::SubmissionIndex> {
        self.checked(label, || {
            let mut enc = self.encoder(label);
            encode_ops(&mut enc, label, segments.iter().flat_map(|s| s.iter()));
            self.queue.submit([enc.finish()])
        })
    }

    /// Runs a step like [`GpuContext::run_ops`] but with each dispatch in its
    /// own compute pass between two timestamps, and returns every dispatch's
    /// label with its GPU time in nanoseconds (in step order). Needs the
    /// timestamp-query feature; without it, each dispatch is submitted alone
    /// and timed on the host from submission to idle (an upper bound).
    pub fn profile_ops(&self, label: &str, segments: &[&[Op]]) -> Result<Vec<(String, f64)>> {
        let ops: Vec<&Op> = segments.iter().flat_map(|s| s.iter()).collect();
        let n = ops.iter().filter(|o| matches!(o, Op::Dispatch(_))).count();
        if !self.caps.features.timestamps {
            let mut out = Vec::with_capacity(n);
            for op in ops {
                let start = std::time::Instant::now();
                self.checked(label, || {
                    let mut enc = self.encoder(label);
                    encode_ops(&mut enc, label, std::iter::once(op));
                    self.queue.submit([enc.finish()])
                })?;
                self.wait_idle()?;
                if let Op::Dispatch(d) = op {
                    out.push((d.label.clone(), start.elapsed().as_secs_f64() * 1e9));
                }
            }
            return Ok(out);
        }
        let count = (2 * n).max(2) as u32;
        let bytes = count as u64 * 8;
        let (query_set, resolve) = self.checked(label, || {
            let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kvsift.profile"),
                ty: wgpu::QueryType::Timestamp,
                count,
            });
            let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kvsift.profile.resolve"),
                size: bytes,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (qs, resolve)
        })?;
        let mut labels = Vec::with_capacity(n);
        self.checked(label, || {
            let mut enc = self.encoder(label);
            for op in &ops {
                match op {
                    Op::Dispatch(d) => {
                        let i = labels.len() as u32;
                        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(&d.label),
                            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                query_set: &query_set,
                                beginning_of_pass_write_index: Some(2 * i),
                                end_of_pass_write_index: Some(2 * i + 1),
                            }),
                        });
                        d.encode(&mut pass);
                        drop(pass);
                        labels.push(d.label.clone());
                    }
                    Op::Copy(c) => enc.copy_buffer_to_buffer(
                        &c.src,
                        c.src_offset,
                        &c.dst,
                        c.dst_offset,
                        c.size,
                    ),
                }
            }
            enc.resolve_query_set(&query_set, 0..count, &resolve, 0);
            self.queue.submit([enc.finish()])
        })?;
        let raw = super::buffer::read_bytes(self, &resolve, "profile timestamps", 0, bytes)?;
        let ticks: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let period = self.queue.get_timestamp_period() as f64;
        Ok(labels
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let t = ticks[2 * i + 1].saturating_sub(ticks[2 * i]);
                (l, t as f64 * period)
            })
            .collect())
    }

    pub fn encoder(&self, label: &str) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }
}

fn encode_dispatches<'a>(
    enc: &mut wgpu::CommandEncoder,
    label: &str,
    dispatches: impl Iterator<Item = &'a Dispatch>,
) {
    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some(label),
        timestamp_writes: None,
    });
    for d in dispatches {
        d.encode(&mut pass);
    }
}

/// Encodes `ops` in order: runs of dispatches share one compute pass, copies
/// go between passes.
pub fn encode_ops<'a>(
    enc: &mut wgpu::CommandEncoder,
    label: &str,
    ops: impl Iterator<Item = &'a Op>,
) {
    let mut pass: Option<wgpu::ComputePass<'static>> = None;
    for op in ops {
        match op {
            Op::Dispatch(d) => {
                let p = pass.get_or_insert_with(|| {
                    enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some(label),
                        timestamp_writes: None,
                    })
                    .forget_lifetime()
                });
                d.encode(p);
            }
            Op::Copy(c) => {
                pass = None;
                enc.copy_buffer_to_buffer(&c.src, c.src_offset, &c.dst, c.dst_offset, c.size);
            }
        }
    }
}

/// A buffer-to-buffer copy inside a step (byte offsets and size multiples of 4).
#[derive(Clone)]
pub struct BufferCopy {
    pub src: wgpu::Buffer,
    pub src_offset: u64,
    pub dst: wgpu::Buffer,
    pub dst_offset: u64,
    pub size: u64,
}

/// One recorded command of a step (clones share the GPU objects).
#[derive(Clone)]
pub enum Op {
    Dispatch(Dispatch),
    Copy(BufferCopy),
}

impl From<Dispatch> for Op {
    fn from(d: Dispatch) -> Self {
        Op::Dispatch(d)
    }
}

/// One recorded kernel launch: everything it needs is created up front, so
/// encoding it allocates nothing. Clones share the pipeline, bind group and
/// parameter buffer.
#[derive(Clone)]
pub struct Dispatch {
    pub label: String,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    /// The uniform at binding 0, for kernels that take parameters.
    params: Option<wgpu::Buffer>,
    pub workgroups: [u32; 3],
}

impl Dispatch {
    /// Binds a new uniform holding `params` to binding 0 and each resource to
    /// its given binding (for entry points that use a sparse set of bindings).
    pub fn with_params_at<P: bytemuck::Pod>(
        ctx: &GpuContext,
        pipeline: wgpu::ComputePipeline,
        label: String,
        params: &P,
        resources: &[(u32, wgpu::BindingResource<'_>)],
        workgroups: [u32; 3],
    ) -> Result<Self> {
        let uniform = ctx.uniform(&label, params)?;
        let mut entries = Vec::with_capacity(resources.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        });
        entries.extend(resources.iter().map(|(binding, r)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: r.clone(),
        }));
        let mut d = Self::from_entries(ctx, pipeline, label, &entries, workgroups)?;
        d.params = Some(uniform);
        Ok(d)
    }

    /// Binds a new uniform holding `params` to binding 0 and `resources` to
    /// bindings 1.. in order.
    pub fn with_params<P: bytemuck::Pod>(
        ctx: &GpuContext,
        pipeline: wgpu::ComputePipeline,
        label: String,
        params: &P,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
    ) -> Result<Self> {
        let uniform = ctx.uniform(&label, params)?;
        let mut all = Vec::with_capacity(resources.len() + 1);
        all.push(uniform.as_entire_binding());
        all.extend(resources.iter().cloned());
        let mut d = Self::new(ctx, pipeline, label, &all, workgroups)?;
        d.params = Some(uniform);
        Ok(d)
    }

    /// Rewrites the parameters (same type as given to `with_params`); lands
    /// before the next submission. For per-step values such as an offset or
    /// a random draw.
    pub fn write_params<P: bytemuck::Pod>(&self, ctx: &GpuContext, params: &P) -> Result<()> {
        let buffer = self.params.as_ref().ok_or_else(|| {
            Error::invalid(format!("dispatch {}", self.label), "has no parameters")
        })?;
        if (std::mem::size_of::<P>() as u64) > buffer.size() {
            return Err(Error::invalid(
                format!("dispatch {}", self.label),
                "parameters larger than its parameter buffer",
            ));
        }
        ctx.queue
            .write_buffer(buffer, 0, bytemuck::bytes_of(params));
        Ok(())
    }

    /// Binds `resources` to `@group(0) @binding(0..)` in order.
    pub fn new(
        ctx: &GpuContext,
        pipeline: wgpu::ComputePipeline,
        label: String,
        resources: &[wgpu::BindingResource<'_>],
        workgroups: [u32; 3],
    ) -> Result<Self> {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        Self::from_entries(ctx, pipeline, label, &entries, workgroups)
    }

    fn from_entries(
        ctx: &GpuContext,
        pipeline: wgpu::ComputePipeline,
        label: String,
        entries: &[wgpu::BindGroupEntry<'_>],
        workgroups: [u32; 3],
    ) -> Result<Self> {
        let bind_group = ctx.checked(&label, || {
            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&label),
                layout: &pipeline.get_bind_group_layout(0),
                entries,
            })
        })?;
        Ok(Self {
            label,
            pipeline,
            bind_group,
            params: None,
            workgroups,
        })
    }

    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::gpu::{GpuBuffer, GpuOptions, OptionalFeatures};
    use crate::testing::gpu;

    static NEEDS_SUBGROUPS: Kernel = Kernel {
        name: "needs_subgroups",
        sources: &["@compute @workgroup_size(1) fn main() {}"],
        entries: &["main"],
        needs: OptionalFeatures {
            shader_f16: false,
            subgroups: true,
            timestamps: false,
        },
    };

    #[test]
    fn a_bad_binding_is_a_gpu_error_naming_the_dispatch() {
        let Some(ctx) = gpu() else { return };
        let pipeline = ctx
            .pipeline(&crate::ops::add::ADD, "add_inplace", &[("WG", 256.0)])
            .unwrap();
        let x = GpuBuffer::<f32>::zeros(ctx, "x", 4).unwrap();
        // A uniform buffer where the kernel wants read-write storage.
        let not_storage = ctx.uniform("params", &[0u32; 4]).unwrap();
        let r = Dispatch::new(
            ctx,
            pipeline,
            "kvsift.test.bad_binding".into(),
            &[
                not_storage.as_entire_binding(),
                x.binding(),
                not_storage.as_entire_binding(),
            ],
            [1, 1, 1],
        );
        match r {
            Err(Error::Gpu { during, message }) => {
                assert!(
                    during.contains("kvsift.test.bad_binding"),
                    "{during}: {message}"
                )
            }
            Err(e) => panic!("expected a GPU validation error, got {e}"),
            Ok(_) => panic!("binding a uniform buffer as storage was accepted"),
        }
        // The error was consumed by its scope; the context stays usable.
        ctx.take_uncaptured("after").unwrap();
    }

    #[test]
    fn a_missing_feature_is_a_typed_error() {
        if gpu().is_none() {
            return;
        }
        let opts = GpuOptions {
            disable: OptionalFeatures::ALL,
            ..GpuOptions::from_env().unwrap()
        };
        let ctx = GpuContext::new(&opts).unwrap();
        assert_eq!(ctx.caps.features, OptionalFeatures::NONE);
        match ctx.pipeline(&NEEDS_SUBGROUPS, "main", &[]) {
            Err(Error::MissingFeature { feature, .. }) => assert_eq!(feature, "subgroups"),
            Err(e) => panic!("expected MissingFeature, got {e}"),
            Ok(_) => panic!("a subgroup kernel was built without subgroups"),
        }
        // The portable kernels still pick their fallback path.
        assert_eq!(crate::ops::linear::MATVEC.pick(&ctx).name, "matvec");
    }

    #[test]
    fn a_buffer_over_the_device_limit_is_a_typed_error() {
        let Some(ctx) = gpu() else { return };
        let len = (ctx.caps.max_buffer_bytes / 4 + 1) as usize;
        match GpuBuffer::<f32>::zeros(ctx, "too_big", len) {
            Err(Error::LimitExceeded { limit_name, .. }) => {
                assert_eq!(limit_name, "max_buffer_size")
            }
            Err(e) => panic!("expected LimitExceeded, got {e}"),
            Ok(_) => panic!("allocated a buffer over max_buffer_size"),
        }
    }

    #[test]
    fn pipelines_are_cached_by_kernel_entry_and_constants() {
        let Some(ctx) = gpu() else { return };
        let k = &crate::ops::add::ADD;
        let a = ctx.pipeline(k, "add_inplace", &[("WG", 64.0)]).unwrap();
        let b = ctx.pipeline(k, "add_inplace", &[("WG", 64.0)]).unwrap();
        let c = ctx.pipeline(k, "add_inplace", &[("WG", 128.0)]).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn grids_fold_large_counts_under_the_dimension_limit() {
        let Some(ctx) = gpu() else { return };
        let max = ctx.caps.max_workgroups_per_dim;
        assert_eq!(ctx.grid(5), [5, 1, 1]);
        for n in [max, max + 1, 3 * max + 7] {
            let [x, y, _] = ctx.grid(n);
            assert!(
                x <= max && y <= max && (x as u64 * y as u64) >= n as u64,
                "{n} -> {x} x {y}"
            );
        }
    }
}
