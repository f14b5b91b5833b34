//! Adapter choice and the device every kernel runs on.
//!
//! The adapter comes from `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` when set, else the
//! best one present (discrete > integrated > virtual > CPU). The device is opened
//! with the adapter's *real* limits (never `Limits::default()`) and with the
//! optional features kvsift can use (shader-f16, subgroups, timestamp queries)
//! only where offered; every kernel has a path that needs none of them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Optional device features kvsift knows how to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalFeatures {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
}

impl OptionalFeatures {
    pub const ALL: Self = Self {
        shader_f16: true,
        subgroups: true,
        timestamps: true,
    };
    pub const NONE: Self = Self {
        shader_f16: false,
        subgroups: false,
        timestamps: false,
    };

    /// Parses a comma list such as `f16,subgroups,timestamps` (also `all`, `none`).
    pub fn parse(var: &'static str, list: &str) -> Result<Self> {
        let mut out = Self::NONE;
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.to_ascii_lowercase().as_str() {
                "f16" | "shader-f16" | "shader_f16" => out.shader_f16 = true,
                "subgroups" | "subgroup" => out.subgroups = true,
                "timestamps" | "timestamp" | "timestamp-query" => out.timestamps = true,
                "all" => out = Self::ALL,
                "none" => {}
                other => {
                    return Err(Error::BadEnv {
                        var,
                        value: list.to_string(),
                        reason: format!(
                            "unknown feature {other:?}; expected a comma list of f16, subgroups, timestamps"
                        ),
                    });
                }
            }
        }
        Ok(out)
    }

    fn minus(self, off: Self) -> Self {
        Self {
            shader_f16: self.shader_f16 && !off.shader_f16,
            subgroups: self.subgroups && !off.subgroups,
            timestamps: self.timestamps && !off.timestamps,
        }
    }

    fn from_wgpu(f: wgpu::Features) -> Self {
        Self {
            shader_f16: f.contains(wgpu::Features::SHADER_F16),
            subgroups: f.contains(wgpu::Features::SUBGROUP),
            timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        }
    }

    fn to_wgpu(self, offered: wgpu::Features) -> wgpu::Features {
        let mut f = wgpu::Features::empty();
        if self.shader_f16 {
            f |= wgpu::Features::SHADER_F16;
        }
        if self.subgroups {
            f |= wgpu::Features::SUBGROUP;
        }
        if self.timestamps {
            // Timestamps between dispatches need the "inside passes/encoders" variants.
            f |= wgpu::Features::TIMESTAMP_QUERY;
            f |= offered
                & (wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
                    | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        }
        f
    }
}

/// How to choose and open the GPU.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Backends to consider (`WGPU_BACKEND`, default: all compiled in).
    pub backends: wgpu::Backends,
    /// Case-insensitive substring the adapter name must contain (`WGPU_ADAPTER_NAME`).
    pub adapter_name: Option<String>,
    /// Optional features to leave off even when offered (`KVSIFT_DISABLE_FEATURES`),
    /// to exercise the fallback paths.
    pub disable: OptionalFeatures,
    /// Cap on the storage-binding size kvsift plans with (`KVSIFT_MAX_BINDING_MB`);
    /// lowers the adapter's limit so the tensor-splitting path can be tested
    /// with small tensors. Never raises it.
    pub max_binding_bytes: Option<u64>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            backends: wgpu::Backends::all(),
            adapter_name: None,
            disable: OptionalFeatures::NONE,
            max_binding_bytes: None,
        }
    }
}

impl GpuOptions {
    /// Options from the environment variables kvsift honours:
    /// `WGPU_BACKEND`, `WGPU_ADAPTER_NAME`, `KVSIFT_DISABLE_FEATURES`, `KVSIFT_MAX_BINDING_MB`.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        if let Ok(v) = std::env::var("WGPU_BACKEND") {
            o.backends = parse_backends(&v)?;
        }
        if let Ok(v) = std::env::var("WGPU_ADAPTER_NAME")
            && !v.trim().is_empty()
        {
            o.adapter_name = Some(v.trim().to_string());
        }
        if let Ok(v) = std::env::var("KVSIFT_DISABLE_FEATURES") {
            o.disable = OptionalFeatures::parse("KVSIFT_DISABLE_FEATURES", &v)?;
        }
        if let Ok(v) = std::env::var("KVSIFT_MAX_BINDING_MB") {
            let mb: f64 = v.trim().parse().map_err(|_| Error::BadEnv {
                var: "KVSIFT_MAX_BINDING_MB",
                value: v.clone(),
                reason: "expected a number of MiB".into(),
            })?;
            // Below a MiB the planning it tests (matrix parts, pool shards)
            // leaves no room for a KV pool worth the name.
            if !(mb.is_finite() && mb >= 1.0) {
                return Err(Error::BadEnv {
                    var: "KVSIFT_MAX_BINDING_MB",
                    value: v,
                    reason: "must be at least 1 (MiB); it only lowers the device's \
                             storage-binding limit, to test the splitting paths"
                        .into(),
                });
            }
            o.max_binding_bytes = Some((mb * 1024.0 * 1024.0) as u64);
        }
        Ok(o)
    }
}

/// Parses `WGPU_BACKEND`: a comma list of vulkan|vk, metal|mtl, dx12|d3d12, gl|gles|opengl.
/// Unlike wgpu's parser this rejects unknown names instead of ignoring them.
pub fn parse_backends(list: &str) -> Result<wgpu::Backends> {
    let mut b = wgpu::Backends::empty();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        b |= match item.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "primary" => wgpu::Backends::PRIMARY,
            "all" => wgpu::Backends::all(),
            other => {
                return Err(Error::BadEnv {
                    var: "WGPU_BACKEND",
                    value: list.to_string(),
                    reason: format!(
                        "unknown backend {other:?}; expected vulkan, metal, dx12, gl (comma separated)"
                    ),
                });
            }
        };
    }
    if b.is_empty() {
        return Err(Error::BadEnv {
            var: "WGPU_BACKEND",
            value: list.to_string(),
            reason: "names no backend".into(),
        });
    }
    Ok(b)
}

/// What the kernels may rely on, read from the opened device.
#[derive(Clone, Debug)]
pub struct DeviceCaps {
    pub features: OptionalFeatures,
    /// `unpack2x16float` is available (WebGPU core; missing only on some
    /// downlevel GL adapters, where f16 weights are refused).
    pub f16_in_f32: bool,
    /// Largest storage binding kvsift plans with (adapter limit, possibly capped).
    pub max_binding_bytes: u64,
    pub max_buffer_bytes: u64,
    pub storage_offset_alignment: u64,
    pub max_workgroup_invocations: u32,
    pub max_workgroup_storage_bytes: u32,
    pub max_workgroups_per_dim: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
}

/// One adapter as `kvsift info` shows it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub backend: wgpu::Backend,
    pub name: String,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub driver_info: String,
}

impl AdapterSummary {
    pub fn of(info: &wgpu::AdapterInfo) -> Self {
        Self {
            backend: info.backend,
            name: info.name.clone(),
            device_type: info.device_type,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
        }
    }
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({:?}, {:?}, driver {} {})",
            self.name, self.backend, self.device_type, self.driver, self.driver_info
        )
    }
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// Every adapter the instance sees for `backends`, in kvsift's preference order.
pub fn list_adapters(instance: &wgpu::Instance, backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (type_rank(i.device_type), backend_rank(i.backend))
    });
    adapters
}

fn make_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    desc.flags = wgpu::InstanceFlags::from_build_config().with_env();
    wgpu::Instance::new(desc)
}

/// The opened GPU: adapter, device, queue, capabilities, and the pipeline cache.
pub struct GpuContext {
    pub instance: wgpu::Instance,
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_summary: AdapterSummary,
    pub caps: DeviceCaps,
    pub(crate) pipelines: super::pipeline::PipelineCache,
    uncaptured: Arc<Mutex<Option<String>>>,
    faults: FaultHook,
}

/// Test hook: makes the Nth checked GPU call (submission, buffer or pipeline
/// creation) fail as a GPU error would, to prove the engine recovers.
#[derive(Debug, Default)]
struct FaultHook {
    calls: AtomicU64,
    /// The call number that fails (0: none).
    fail_at: AtomicU64,
    /// Every call after `fail_at` fails too (a lost device).
    sticky: AtomicBool,
}

impl GpuContext {
    /// Opens the GPU chosen by the environment (see [`GpuOptions::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(&GpuOptions::from_env()?)
    }

    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let instance = make_instance(opts.backends);
        let adapters = list_adapters(&instance, opts.backends);
        let seen: Vec<String> = adapters
            .iter()
            .map(|a| AdapterSummary::of(&a.get_info()).to_string())
            .collect();
        let filter = opts.adapter_name.as_ref().map(|n| n.to_lowercase());
        let adapter = adapters
            .into_iter()
            .find(|a| match &filter {
                Some(f) => a.get_info().name.to_lowercase().contains(f.as_str()),
                None => true,
            })
            .ok_or_else(|| Error::NoAdapter {
                backends: format!("{:?}", opts.backends),
                name_filter: opts.adapter_name.clone(),
                seen,
            })?;
        Self::open(instance, adapter, opts)
    }

    fn open(instance: wgpu::Instance, adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        let summary = AdapterSummary::of(&info);
        let offered = adapter.features();
        let features = OptionalFeatures::from_wgpu(offered).minus(opts.disable);
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kvsift.device"),
            required_features: features.to_wgpu(offered),
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| Error::RequestDevice {
            adapter: info.name.clone(),
            source,
        })?;

        // wgpu's default handler panics; kvsift logs and keeps the message so the
        // next checked call can turn it into an error.
        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("uncaptured GPU error: {e}");
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));

        let mut max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(cap) = opts.max_binding_bytes {
            max_binding = max_binding.min(cap.max(256));
        }
        let caps = DeviceCaps {
            features,
            f16_in_f32: adapter
                .get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32),
            max_binding_bytes: max_binding,
            max_buffer_bytes: limits.max_buffer_size,
            storage_offset_alignment: limits.min_storage_buffer_offset_alignment as u64,
            max_workgroup_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroup_storage_bytes: limits.max_compute_workgroup_storage_size,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
        };
        log::info!("kvsift GPU: {summary}; features {features:?}; max binding {max_binding} B");
        Ok(Self {
            instance,
            adapter,
            device,
            queue,
            adapter_summary: summary,
            caps,
            pipelines: Default::default(),
            uncaptured,
            faults: FaultHook::default(),
        })
    }

    /// Test hook: the `n`th checked GPU call from now (1: the next) fails
    /// with an injected GPU error; with `sticky`, every later one too. Only
    /// for tests of error paths; a context shared with other work should
    /// not be used.
    #[doc(hidden)]
    pub fn inject_fault(&self, n: u64, sticky: bool) {
        let now = self.faults.calls.load(Ordering::SeqCst);
        self.faults.sticky.store(sticky, Ordering::SeqCst);
        self.faults.fail_at.store(now + n.max(1), Ordering::SeqCst);
    }

    /// Test hook: no more injected faults.
    #[doc(hidden)]
    pub fn clear_faults(&self) {
        self.faults.fail_at.store(0, Ordering::SeqCst);
    }

    /// Test hook: checked GPU calls made so far (the points a fault can hit).
    #[doc(hidden)]
    pub fn gpu_calls(&self) -> u64 {
        self.faults.calls.load(Ordering::SeqCst)
    }

    /// Runs `f` inside validation and out-of-memory error scopes and returns the
    /// first error wgpu reported as `Error::Gpu`, naming `during`.
    pub fn checked<T>(&self, during: &str, f: impl FnOnce() -> T) -> Result<T> {
        let call = self.faults.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fail_at = self.faults.fail_at.load(Ordering::SeqCst);
        if fail_at != 0
            && (call == fail_at || (call > fail_at && self.faults.sticky.load(Ordering::SeqCst)))
        {
            return Err(Error::Gpu {
                during: during.to_string(),
                message: format!("injected fault at GPU call {call} (test hook)"),
            });
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let m = pollster::block_on(oom.pop());
        if let Some(e) = v.or(m) {
            return Err(Error::Gpu {
                during: during.to_string(),
                message: e.to_string(),
            });
        }
        self.take_uncaptured(during)?;
        Ok(out)
    }

    /// Returns (and clears) an error that happened outside any scope.
    pub fn take_uncaptured(&self, during: &str) -> Result<()> {
        let mut slot = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(message) => Err(Error::Gpu {
                during: format!("{during} (reported asynchronously)"),
                message,
            }),
            None => Ok(()),
        }
    }

    /// Blocks until all submitted work has finished.
    pub fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                during: "waiting for the GPU".into(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// Fails with `MissingFeature` unless every feature in `needs` is enabled.
    pub fn require(&self, what: &str, needs: OptionalFeatures) -> Result<()> {
        let have = self.caps.features;
        let missing = if needs.shader_f16 && !have.shader_f16 {
            Some("shader-f16")
        } else if needs.subgroups && !have.subgroups {
            Some("subgroups")
        } else if needs.timestamps && !have.timestamps {
            Some("timestamp-query")
        } else {
            None
        };
        match missing {
            Some(feature) => Err(Error::MissingFeature {
                what: what.to_string(),
                feature,
                adapter: self.adapter_summary.name.clone(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_list_parses_and_rejects_unknown_names() {
        assert_eq!(
            parse_backends("Vulkan, gl").unwrap(),
            wgpu::Backends::VULKAN | wgpu::Backends::GL
        );
        let e = parse_backends("vulkan,cuda").unwrap_err().to_string();
        assert!(e.contains("WGPU_BACKEND") && e.contains("cuda"), "{e}");
        assert!(parse_backends(" , ").is_err());
    }

    #[test]
    fn feature_list_parses_and_rejects_unknown_names() {
        let f = OptionalFeatures::parse("X", "f16, subgroups").unwrap();
        assert!(f.shader_f16 && f.subgroups && !f.timestamps);
        assert_eq!(
            OptionalFeatures::parse("X", "all").unwrap(),
            OptionalFeatures::ALL
        );
        let e = OptionalFeatures::parse("X", "f16,tensorcores")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensorcores"), "{e}");
    }

    #[test]
    fn no_matching_adapter_is_a_clear_error() {
        let opts = GpuOptions {
            adapter_name: Some("no-such-adapter-xyz".into()),
            ..GpuOptions::default()
        };
        match GpuContext::new(&opts) {
            Err(Error::NoAdapter { name_filter, .. }) => {
                assert_eq!(name_filter.as_deref(), Some("no-such-adapter-xyz"))
            }
            Err(other) => panic!("expected NoAdapter, got {other}"),
            Ok(ctx) => panic!("expected NoAdapter, got {}", ctx.adapter_summary),
        }
    }
}
