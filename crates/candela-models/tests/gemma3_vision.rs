//! Gemma 3's image path (SigLIP tower + projector) against transformers on
//! the gemma3-vision-tiny fixture (scripts/make_gemma3_vision_fixture.py):
//! the projector's rows for each image of the fixture, from transformers'
//! own pixel values.

mod common;

use common::{fixture_dir, max_diff, reference};

use candela_core::request::MmFeatures;
use candela_models::families::gemma3::vision::{
    Gemma3ImageEncoder, Gemma3VisionConfig, PIXEL_VALUES,
};
use candela_models::multimodal::MediaEncoder;
use candela_models::weights::Weights;
use candle_core::{DType, Device};
use serde_json::Value;

const ATOL: f32 = 1e-4;

#[test]
fn image_features_match_transformers() {
    let dir = fixture_dir("gemma3-vision-tiny");
    let (refs, tensors) = reference(&dir);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = Gemma3VisionConfig::from_json(&config).unwrap();
    assert_eq!(
        (cfg.mm_tokens_per_image, cfg.image_token_id),
        (16, refs["image_token_id"].as_u64().unwrap() as u32)
    );
    let text_hidden = config["text_config"]["hidden_size"].as_u64().unwrap() as usize;
    let w = Weights::from_safetensors_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let encoder = Gemma3ImageEncoder::load(&cfg, &w, text_hidden).unwrap();
    let mut checked = 0;
    for (case, spec) in refs["cases"].as_object().unwrap() {
        for i in 0..spec["media"].as_array().unwrap().len() {
            let pixels = tensors[&format!("{case}.item{i}.pixel_values")].clone();
            let features = MmFeatures {
                tensors: vec![(PIXEL_VALUES.to_string(), pixels)],
            };
            let got = encoder.encode(&features).unwrap();
            let want = &tensors[&format!("{case}.item{i}.embeds")];
            assert_eq!(got.dims(), want.dims());
            let d = max_diff(&got, want);
            eprintln!("{case} item {i}: max |diff| {d:.2e}");
            assert!(d <= ATOL, "{case} item {i}: {d}");
            checked += 1;
        }
    }
    assert_eq!(checked, 3);
}
