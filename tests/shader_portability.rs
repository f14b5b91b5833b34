//! Every shader is parsed and validated by naga and translated to SPIR-V
//! (Vulkan), MSL (Metal) and HLSL (DX12) with naga's back ends, for each entry
//! point and several override values. Needs no GPU, so Metal and DX12
//! portability is checked on every run.

use kvsift::gpu::Kernel;
use kvsift::kernels as all_kernels;
use naga::back::{hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

/// The capabilities a kernel may use: WebGPU core (which includes
/// `unpack2x16float`, naga's SHADER_FLOAT16_IN_FLOAT32), plus those its
/// optional features imply.
fn capabilities(kernel: &Kernel) -> Capabilities {
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if kernel.needs.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    if kernel.needs.shader_f16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    caps
}

fn override_sets(module: &naga::Module) -> Vec<naga::back::PipelineConstants> {
    let has_wg = module
        .overrides
        .iter()
        .any(|(_, o)| o.name.as_deref() == Some("WG"));
    let mut sets = vec![naga::back::PipelineConstants::default()];
    if has_wg {
        for wg in [64.0, 128.0, 256.0] {
            let mut c = naga::back::PipelineConstants::default();
            c.insert("WG".to_string(), wg);
            sets.push(c);
        }
    }
    sets
}

fn check_kernel(kernel: &Kernel) -> Result<usize, String> {
    let source = kernel.source();
    let module = naga::front::wgsl::parse_str(&source)
        .map_err(|e| format!("parse:\n{}", e.emit_to_string(&source)))?;
    let caps = capabilities(kernel);
    for (backend, supported) in [
        ("spv", spv::supported_capabilities()),
        ("msl", msl::supported_capabilities()),
        ("hlsl", hlsl::supported_capabilities()),
    ] {
        if !supported.contains(caps) {
            return Err(format!("{backend} back end lacks capabilities {caps:?}"));
        }
    }
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| format!("validate:\n{}", e.emit_to_string(&source)))?;

    let mut translations = 0;
    for constants in override_sets(&module) {
        for entry in kernel.entries {
            let ep = Some((naga::ShaderStage::Compute, *entry));
            let (m, i) =
                naga::back::pipeline_constants::process_overrides(&module, &info, ep, &constants)
                    .map_err(|e| format!("{entry} overrides {constants:?}: {e}"))?;
            // Each back end again validates what it needs.
            let at = |b: &str, e: String| format!("{entry} -> {b} with {constants:?}: {e}");

            let spv_opts = spv::Options {
                lang_version: (1, 3),
                ..Default::default()
            };
            let spv_pipe = spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: entry.to_string(),
            };
            let words = spv::write_vec(&m, &i, &spv_opts, Some(&spv_pipe))
                .map_err(|e| at("spv", e.to_string()))?;
            assert!(
                words.len() > 5 && words[0] == 0x0723_0203,
                "{entry}: not SPIR-V"
            );

            let msl_opts = msl::Options {
                lang_version: (2, 4),
                ..Default::default()
            };
            let msl_pipe = msl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
                ..Default::default()
            };
            let (text, _) = msl::write_string(&m, &i, &msl_opts, &msl_pipe)
                .map_err(|e| at("msl", e.to_string()))?;
            assert!(
                text.contains("kernel"),
                "{entry}: no Metal kernel in\n{text}"
            );

            // DX12 through FXC (shader model 5.1) unless the kernel needs wave ops.
            let hlsl_opts = hlsl::Options {
                shader_model: if kernel.needs.subgroups {
                    hlsl::ShaderModel::V6_0
                } else {
                    hlsl::ShaderModel::V5_1
                },
                ..Default::default()
            };
            let hlsl_pipe = hlsl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, entry.to_string())),
            };
            let mut text = String::new();
            hlsl::Writer::new(&mut text, &hlsl_opts, &hlsl_pipe)
                .write(&m, &i, None)
                .map_err(|e| at("hlsl", e.to_string()))?;
            assert!(
                text.contains("numthreads"),
                "{entry}: no HLSL compute entry in\n{text}"
            );
            translations += 3;
        }
    }
    Ok(translations)
}

#[test]
fn every_shader_validates_and_translates_to_spirv_msl_hlsl() {
    let mut failures = Vec::new();
    let mut total = 0;
    for kernel in all_kernels() {
        match check_kernel(kernel) {
            Ok(n) => total += n,
            Err(e) => failures.push(format!("kernel {}: {e}", kernel.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!("{} kernels, {total} translations", all_kernels().len());
}

#[test]
fn a_broken_shader_is_rejected() {
    // The check above must be able to fail: a kernel with a type error.
    static BROKEN: Kernel = Kernel {
        name: "broken",
        sources: &["@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }"],
        entries: &["main"],
        needs: kvsift::gpu::OptionalFeatures::NONE,
    };
    assert!(check_kernel(&BROKEN).is_err());
}

#[test]
fn every_kernel_file_in_shaders_is_used() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let sources: Vec<String> = all_kernels().iter().map(|k| k.source()).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("wgsl") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            sources.iter().any(|s| s.contains(text.trim())),
            "{} is not part of any kernel in kvsift::kernels()",
            path.display()
        );
    }
}

/// Every `#[repr(C)]` struct the host writes for a kernel has the layout of
/// the WGSL struct the kernel reads (size, and each member's name and
/// offset, by naga's layouter), in every kernel that declares it.
#[test]
fn host_structs_match_their_wgsl_structs() {
    let layouts = kvsift::host_layouts();
    assert!(layouts.len() >= 15, "{} layouts", layouts.len());
    for l in &layouts {
        for kernel in &l.kernels {
            let source = kernel.source();
            let module = naga::front::wgsl::parse_str(&source)
                .unwrap_or_else(|e| panic!("{}: {}", kernel.name, e.emit_to_string(&source)));
            let (_, ty) = module
                .types
                .iter()
                .find(|(_, t)| t.name.as_deref() == Some(l.wgsl))
                .unwrap_or_else(|| panic!("{}: no WGSL struct {}", kernel.name, l.wgsl));
            let naga::TypeInner::Struct { members, span } = &ty.inner else {
                panic!("{}: {} is not a struct", kernel.name, l.wgsl);
            };
            let wgsl: Vec<(String, usize)> = members
                .iter()
                .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize))
                .collect();
            let rust: Vec<(String, usize)> =
                l.fields.iter().map(|(n, o)| (n.to_string(), *o)).collect();
            assert_eq!(
                rust, wgsl,
                "{} against {}'s {} (name, offset)",
                l.rust, kernel.name, l.wgsl
            );
            assert_eq!(
                l.size, *span as usize,
                "{}: {} bytes, {}'s {} {span}",
                l.rust, kernel.name, l.wgsl, l.size
            );
        }
    }
}
