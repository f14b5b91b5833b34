//! `kvsift info`: every adapter, the chosen one, its features and key limits.

use clap::Args;
use kvsift::gpu::context::{AdapterSummary, list_adapters};
use kvsift::gpu::{GpuContext, GpuOptions};
use serde_json::json;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let opts = GpuOptions::from_env()?;
    let instance = wgpu::Instance::new({
        let mut d = wgpu::InstanceDescriptor::new_without_display_handle();
        d.backends = opts.backends;
        d
    });
    let adapters: Vec<AdapterSummary> = list_adapters(&instance, opts.backends)
        .iter()
        .map(|a| AdapterSummary::of(&a.get_info()))
        .collect();
    let chosen = GpuContext::new(&opts);
    let limits = chosen.as_ref().ok().map(|c| c.device.limits());

    if args.json {
        let adapter_json: Vec<_> = adapters
            .iter()
            .map(|a| {
                json!({"backend": format!("{:?}", a.backend), "name": a.name,
                       "device_type": format!("{:?}", a.device_type),
                       "driver": a.driver, "driver_info": a.driver_info})
            })
            .collect();
        let chosen_json = match (&chosen, &limits) {
            (Ok(c), Some(l)) => json!({
                "name": c.adapter_summary.name,
                "backend": format!("{:?}", c.adapter_summary.backend),
                "features": {
                    "shader_f16": c.caps.features.shader_f16,
                    "subgroups": c.caps.features.subgroups,
                    "timestamps": c.caps.features.timestamps,
                    "f16_in_f32": c.caps.f16_in_f32,
                },
                "subgroup_size": [c.caps.subgroup_min_size, c.caps.subgroup_max_size],
                "limits": {
                    "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                    "max_buffer_size": l.max_buffer_size,
                    "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                    "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
                    "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
                    "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
                    "min_storage_buffer_offset_alignment": l.min_storage_buffer_offset_alignment,
                },
                "planned_max_binding_bytes": c.caps.max_binding_bytes,
            }),
            (Err(e), _) => json!({"error": e.to_string()}),
            _ => json!(null),
        };
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"adapters": adapter_json, "chosen": chosen_json})
            )?
        );
        return chosen.map(|_| ()).map_err(Into::into);
    }

    outln!("Adapters ({}):", adapters.len());
    for (i, a) in adapters.iter().enumerate() {
        outln!(
            "  [{i}] {:<8} {:<14} {}  (driver: {} {})",
            format!("{:?}", a.backend),
            format!("{:?}", a.device_type),
            a.name,
            a.driver,
            a.driver_info
        );
    }
    let ctx = chosen?;
    let l = limits.expect("limits of the opened device");
    let c = &ctx.caps;
    let yes = |b: bool| if b { "yes" } else { "no" };
    outln!("\nChosen: {}", ctx.adapter_summary);
    outln!("Features kvsift uses:");
    outln!("  shader-f16       {}", yes(c.features.shader_f16));
    outln!(
        "  subgroups        {} (size {}..{})",
        yes(c.features.subgroups),
        c.subgroup_min_size,
        c.subgroup_max_size
    );
    outln!("  timestamp-query  {}", yes(c.features.timestamps));
    outln!("  unpack2x16float  {} (f16 weights)", yes(c.f16_in_f32));
    outln!("Limits:");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    outln!(
        "  max_storage_buffer_binding_size  {} ({:.0} MiB; kvsift plans with {:.0} MiB)",
        l.max_storage_buffer_binding_size,
        mib(l.max_storage_buffer_binding_size),
        mib(c.max_binding_bytes)
    );
    outln!(
        "  max_buffer_size                  {} ({:.0} MiB)",
        l.max_buffer_size,
        mib(l.max_buffer_size)
    );
    outln!(
        "  max_compute_workgroup_storage    {}",
        l.max_compute_workgroup_storage_size
    );
    outln!(
        "  max_invocations_per_workgroup    {}",
        l.max_compute_invocations_per_workgroup
    );
    outln!(
        "  max_workgroups_per_dimension     {}",
        l.max_compute_workgroups_per_dimension
    );
    outln!(
        "  max_storage_buffers_per_stage    {}",
        l.max_storage_buffers_per_shader_stage
    );
    outln!(
        "  min_storage_offset_alignment     {}",
        l.min_storage_buffer_offset_alignment
    );
    Ok(())
}
