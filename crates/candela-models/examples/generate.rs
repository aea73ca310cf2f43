//! Greedy chat completion with any supported model folder or GGUF file,
//! driving the `Model` trait directly (no engine): one sequence, a trivial
//! block table, token-by-token decode through the paged KV cache.
//!
//! ```text
//! cargo run --release -p candela-models --example generate -- \
//!     /path/to/SmolLM2-135M-Instruct.Q4_1.gguf "What is the capital of France?" [max_new_tokens]
//! ```
//! `CANDELA_SMOLLM2_GGUF` is used when no path is given.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candela_core::model::{ForwardBatch, SeqSlice};
use candela_models::{load, ChatRenderOptions, LoadOptions};

const BLOCK_SIZE: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var("CANDELA_SMOLLM2_GGUF").map_err(|_| {
            "usage: generate <model folder or .gguf> [prompt] [max_new_tokens] (or set CANDELA_SMOLLM2_GGUF)"
        })?),
    };
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".to_string());
    let max_new: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);

    let t0 = Instant::now();
    let mut loaded = load(&path, &LoadOptions::default())?;
    eprintln!(
        "loaded {} ({}) in {:.2}s",
        loaded.model_name,
        loaded.spec.architecture,
        t0.elapsed().as_secs_f64()
    );

    let messages = vec![serde_json::json!({"role": "user", "content": prompt})];
    let opts = ChatRenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let text = loaded.require_chat_template()?.render(&messages, &opts)?;
    let mut tokens = loaded.tokenizer.encode(&text, false)?;
    let prompt_len = tokens.len();

    let max_len = (prompt_len + max_new).min(loaded.spec.max_model_len);
    let num_blocks = max_len.div_ceil(BLOCK_SIZE);
    loaded.model.allocate_kv_cache(num_blocks, BLOCK_SIZE)?;
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let step = |start: usize, end: usize, tokens: &[u32]| ForwardBatch {
        input_ids: tokens[start..end].to_vec(),
        positions: (start as u32..end as u32).collect(),
        slot_mapping: (start as u32..end as u32).collect(),
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: end - start,
            context_len: end,
            block_table: table[..end.div_ceil(BLOCK_SIZE)].to_vec(),
            needs_logits: true,
        }],
        block_size: BLOCK_SIZE,
    };

    let t_prefill = Instant::now();
    let logits = loaded.model.forward(&step(0, prompt_len, &tokens))?;
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    let mut next = logits.get(0)?.argmax(0)?.to_scalar::<u32>()?;

    let eos = &loaded.generation.eos_token_ids;
    let mut generated = Vec::new();
    let mut printed = String::new();
    let t_decode = Instant::now();
    let mut decode_steps = 0usize;
    let mut forward_s = 0f64;
    loop {
        if eos.contains(&next) {
            break;
        }
        generated.push(next);
        tokens.push(next);
        let text = loaded.tokenizer.decode(&generated, true)?;
        if let Some(delta) = text.strip_prefix(printed.as_str()) {
            print!("{delta}");
            std::io::stdout().flush().ok();
        }
        printed = text;
        if generated.len() >= max_new || tokens.len() >= max_len {
            break;
        }
        let n = tokens.len();
        let t = Instant::now();
        let logits = loaded.model.forward(&step(n - 1, n, &tokens))?;
        forward_s += t.elapsed().as_secs_f64();
        decode_steps += 1;
        next = logits.get(0)?.argmax(0)?.to_scalar::<u32>()?;
    }
    let decode_s = t_decode.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "prompt {prompt_len} tokens, prefill {:.1} ms ({:.1} tok/s); generated {} tokens; \
         decode {:.1} tok/s over {} forward steps ({:.1} tok/s wall incl. detokenizing)",
        prefill_s * 1e3,
        prompt_len as f64 / prefill_s,
        generated.len(),
        decode_steps as f64 / forward_s.max(1e-9),
        decode_steps,
        decode_steps as f64 / decode_s.max(1e-9),
    );
    Ok(())
}
