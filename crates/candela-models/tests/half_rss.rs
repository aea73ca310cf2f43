//! bf16 kept bf16 shows in memory: a random Qwen2-shaped bf16 checkpoint
//! (~86 MB, most of it the tied 151,936 x 256 embedding) is written here and
//! loaded in child processes, once with `dtype: 'auto'` and once with
//! `'f32'`; the anonymous (file-free) memory each load adds is compared:
//! kept bf16, the weights take half of what they take widened to f32.
//! The file's own pages (the memory map) are not anonymous memory, so they
//! count in neither.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candela_models::{load, LoadOptions};
use candle_core::{DType, Device, Tensor};

const HIDDEN: usize = 256;
const INTER: usize = 1024;
const LAYERS: usize = 4;
const VOCAB: usize = 151_936;

fn rss_anon_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/self/status")
}

fn write_checkpoint(dir: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen2-tiny");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["hidden_size"] = HIDDEN.into();
    config["intermediate_size"] = INTER.into();
    config["num_hidden_layers"] = LAYERS.into();
    config["num_attention_heads"] = 4.into();
    config["num_key_value_heads"] = 2.into();
    config["vocab_size"] = VOCAB.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let v = Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
        t.insert(name, v.to_dtype(DType::BF16).unwrap());
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN]);
    put("model.norm.weight".into(), &[HIDDEN]);
    let kv = 2 * HIDDEN / 4;
    for i in 0..LAYERS {
        let l = |s: &str| format!("model.layers.{i}.{s}");
        put(l("input_layernorm.weight"), &[HIDDEN]);
        put(l("post_attention_layernorm.weight"), &[HIDDEN]);
        for (p, out) in [("q", HIDDEN), ("k", kv), ("v", kv)] {
            put(l(&format!("self_attn.{p}_proj.weight")), &[out, HIDDEN]);
            put(l(&format!("self_attn.{p}_proj.bias")), &[out]);
        }
        put(l("self_attn.o_proj.weight"), &[HIDDEN, HIDDEN]);
        put(l("mlp.gate_proj.weight"), &[INTER, HIDDEN]);
        put(l("mlp.up_proj.weight"), &[INTER, HIDDEN]);
        put(l("mlp.down_proj.weight"), &[HIDDEN, INTER]);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
}

/// The child's part (run by `bf16_weights_halve_anonymous_memory`): load the
/// checkpoint in `CANDELA_RSS_DIR` with `CANDELA_RSS_DTYPE` and print the
/// anonymous memory the load added.
#[test]
#[ignore = "run in a child process by bf16_weights_halve_anonymous_memory"]
fn load_and_report_rss() {
    let dir = std::env::var("CANDELA_RSS_DIR").expect("CANDELA_RSS_DIR");
    let dtype = std::env::var("CANDELA_RSS_DTYPE").expect("CANDELA_RSS_DTYPE");
    let before = rss_anon_kib();
    let loaded = load(
        Path::new(&dir),
        &LoadOptions {
            dtype: Some(dtype),
            ..Default::default()
        },
    )
    .expect("load");
    let after = rss_anon_kib();
    println!("RSS_ANON_ADDED_KIB {}", after - before);
    drop(loaded);
}

fn child_rss(dir: &Path, dtype: &str) -> u64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "load_and_report_rss", "--nocapture"])
        .env("CANDELA_RSS_DIR", dir)
        .env("CANDELA_RSS_DTYPE", dtype)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("child test process");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("RSS_ANON_ADDED_KIB "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RSS line in {text}"))
}

#[test]
fn bf16_weights_halve_anonymous_memory() {
    let dir = std::env::temp_dir().join(format!("candela-bf16-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_checkpoint(&dir);
    let file_kib = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len()
        / 1024;
    let auto = child_rss(&dir, "auto");
    let f32 = child_rss(&dir, "f32");
    std::fs::remove_dir_all(&dir).ok();
    eprintln!(
        "bf16 checkpoint of {file_kib} KiB: anonymous memory added by the load {auto} KiB with dtype auto, {f32} KiB with f32 ({:.2}x)",
        auto as f64 / f32 as f64
    );
    // Both loads also hold what is not weights (the 151,936-token
    // tokenizer, allocator slack): the weights are the difference. Widened
    // to f32 they take twice the file, kept bf16 the file's size, so the
    // f32 load adds about one file more.
    assert!(
        f32 - auto.min(f32) > file_kib * 8 / 10,
        "dtype auto saved only {} KiB over f32 for a {file_kib} KiB bf16 file",
        f32 - auto.min(f32)
    );
}
