//! Config parsing: every family, bad files.

use super::*;
use serde_json::json;

fn parse(j: Value) -> Result<ModelConfig> {
    ModelConfig::from_json(Path::new("config.json"), &j)
}

fn llama() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 100, "max_position_embeddings": 256,
        "rope_theta": 500000.0, "hidden_act": "silu", "eos_token_id": [1, 2],
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    })
}

#[test]
fn hub_and_v5_layouts_give_the_same_config() {
    let a = parse(llama()).unwrap();
    let mut v5 = llama();
    let o = v5.as_object_mut().unwrap();
    o.remove("rope_theta");
    o.remove("rope_scaling");
    o.insert(
        "rope_parameters".into(),
        json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    );
    let b = parse(v5).unwrap();
    assert_eq!(a.rope, b.rope);
    assert_eq!(a.head_dim, 16);
    assert_eq!(a.eos_token_ids, vec![1, 2]);
    assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
}

#[test]
fn windows_follow_transformers_per_architecture() {
    let mut j = llama();
    j["sliding_window"] = json!(16);
    // Llama's attention never reads sliding_window.
    assert_eq!(parse(j.clone()).unwrap().layer_windows, vec![None, None]);
    j["architectures"] = json!(["MistralForCausalLM"]);
    assert_eq!(parse(j.clone()).unwrap().layer_windows, vec![Some(16); 2]);
    j["sliding_window"] = json!(0);
    let e = parse(j).unwrap_err().to_string();
    assert!(e.contains("sliding_window"), "{e}");
    for bad in [json!([1, 2]), json!("linear"), json!(4.0)] {
        let mut j = llama();
        j["rope_scaling"] = bad;
        let e = parse(j).unwrap_err().to_string();
        assert!(e.contains("rope_scaling") && e.contains("object"), "{e}");
    }
}

#[test]
fn config_files_must_hold_objects() {
    let d = std::env::temp_dir().join(format!("kvsift-cfg-obj-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for text in ["[1]", "\"x\"", "null", "3"] {
        std::fs::write(d.join("config.json"), text).unwrap();
        std::fs::write(d.join("generation_config.json"), text).unwrap();
        for e in [
            ModelConfig::load(&d).unwrap_err().to_string(),
            GenerationDefaults::load(&d).unwrap_err().to_string(),
        ] {
            assert!(e.contains("expected a JSON object"), "{text}: {e}");
        }
    }
}

#[test]
fn a_default_rope_type_ignores_extra_parameters() {
    let mut j = llama();
    j["rope_scaling"] = json!({"rope_type": "default", "factor": 4.0});
    assert_eq!(parse(j).unwrap().rope.scaling, RopeScaling::None);
    let mut j = llama();
    j["rope_scaling"] = json!({"rope_theta": 10000.0});
    assert_eq!(parse(j).unwrap().rope.scaling, RopeScaling::None);
}

#[test]
fn qwen_sliding_window_only_with_use_sliding_window() {
    let mut j = llama();
    j["architectures"] = json!(["Qwen2ForCausalLM"]);
    j["sliding_window"] = json!(16);
    j["max_window_layers"] = json!(1);
    let c = parse(j.clone()).unwrap();
    assert_eq!(c.layer_windows, vec![None, None]);
    assert!(c.qkv_bias && !c.o_bias);
    j["use_sliding_window"] = json!(true);
    assert_eq!(parse(j).unwrap().layer_windows, vec![None, Some(16)]);
}

#[test]
fn bad_configs_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"architectures": ["GPT2LMHeadModel"]}),
            "GPT2LMHeadModel",
        ),
        (
            {
                let mut j = llama();
                j.as_object_mut().unwrap().remove("hidden_size");
                j
            },
            "hidden_size",
        ),
        (
            {
                let mut j = llama();
                j["num_key_value_heads"] = json!(3);
                j
            },
            "num_key_value_heads",
        ),
        (
            {
                let mut j = llama();
                j["hidden_size"] = json!("big");
                j
            },
            "hidden_size",
        ),
        (
            {
                let mut j = llama();
                j["hidden_act"] = json!("gelu");
                j
            },
            "gelu",
        ),
        (
            {
                let mut j = llama();
                j["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
                j
            },
            "yarn",
        ),
        (
            {
                let mut j = llama();
                j["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
                j
            },
            "low_freq_factor",
        ),
        (
            {
                let mut j = llama();
                j["head_dim"] = json!(7);
                j
            },
            "head_dim",
        ),
        // Scaling parameters without a type: transformers refuses them too.
        (
            {
                let mut j = llama();
                j["rope_scaling"] = json!({"factor": 4.0});
                j
            },
            "rope_type",
        ),
        (
            {
                let mut j = llama();
                j["rope_scaling"] = json!({"type": 4, "factor": 4.0});
                j
            },
            "rope_type",
        ),
        (
            {
                let mut j = llama();
                j["num_attention_heads"] = json!(6);
                j["num_key_value_heads"] = json!(6);
                j
            },
            "does not divide hidden_size",
        ),
        (
            {
                let mut j = llama();
                j["num_hidden_layers"] = json!(u64::MAX);
                j
            },
            "num_hidden_layers",
        ),
        (
            {
                let mut j = llama();
                j["vocab_size"] = json!(1u64 << 40);
                j
            },
            "vocab_size",
        ),
        (
            {
                let mut j = llama();
                j["eos_token_id"] = json!([1, 1u64 << 33]);
                j
            },
            "eos_token_id",
        ),
        (
            {
                let mut j = llama();
                j["rope_scaling"]["factor"] = json!(f64::MAX);
                j["rope_scaling"]["low_freq_factor"] = json!(-1.0);
                j
            },
            "rope_scaling",
        ),
    ];
    for (j, needle) in cases {
        let e = parse(j).unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} should mention {needle}");
    }
}
