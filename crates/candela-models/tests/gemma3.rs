//! Gemma 3's language model against transformers on the gemma3-tiny fixture
//! (scripts/make_gemma3_fixture.py): real Gemma 3 tokenizer and chat
//! template, head_dim 128, 2 query heads per KV head, sliding window 6 on
//! layers 0 and 2 (the prompts are 14 and 27 tokens), linear rope scaling on
//! the global layer, final logit softcapping on. Logits at every position, chunked
//! prefill (per-row and tiled kernels, chunks crossing block and window
//! edges) equal to one prefill, a ragged batch equal to each sequence alone,
//! and greedy ids through the engine, alone and batched, with prefill split.
//! With every layer sliding, the engine frees the KV blocks behind the
//! window: greedy ids far past it still match transformers in a pool smaller
//! than one context, and the blocks in use stay bounded.

mod common;

use common::{drain_tokens, fixture_dir, ids_of, max_diff, reference};

use std::path::PathBuf;

use candela_core::model::{ForwardBatch, Model, SeqSlice};
use candela_core::{Engine, EngineConfig, EngineRequest, RequestEvent, SamplingParams};
use candela_models::{
    gemma3, load, ChatRenderOptions, DecoderLm, LoadOptions, LoadedModel, Weights,
};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

const ATOL: f32 = 1e-4;
const BLOCK_SIZE: usize = 4;

fn dir() -> PathBuf {
    fixture_dir("gemma3-tiny")
}

fn load_f32() -> LoadedModel {
    load(
        &dir(),
        &LoadOptions {
            dtype: Some("f32".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The concrete decoder (for every position's logits), f32, with a pool of
/// `blocks` blocks.
fn decoder(blocks: usize) -> DecoderLm {
    let mut m = decoder_with(|_| {});
    m.allocate_kv_cache(blocks, BLOCK_SIZE).unwrap();
    m
}

/// The fixture's decoder, f32, its config.json edited by `edit` first.
fn decoder_with(edit: impl FnOnce(&mut Value)) -> DecoderLm {
    let mut raw: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
    edit(&mut raw);
    let cfg = gemma3::config_from_json(&raw, None).unwrap();
    let w = Weights::from_safetensors_dir(&dir(), DType::F32, &Device::Cpu).unwrap();
    DecoderLm::load(cfg, &w).unwrap()
}

/// One step's share of a sequence: its new ids from position `start`, in
/// the pool blocks `table` (which hold positions `0..start` already).
struct Part<'a> {
    ids: &'a [u32],
    start: usize,
    table: &'a [u32],
}

/// Logits of every new token of the parts, run as one ragged batch.
fn step(m: &mut DecoderLm, parts: &[Part]) -> Tensor {
    let mut b = ForwardBatch {
        block_size: BLOCK_SIZE,
        ..Default::default()
    };
    for p in parts {
        let ctx = p.start + p.ids.len();
        b.seqs.push(SeqSlice {
            query_start: b.input_ids.len(),
            query_len: p.ids.len(),
            context_len: ctx,
            block_table: p.table[..ctx.div_ceil(BLOCK_SIZE)].to_vec(),
            needs_logits: true,
        });
        b.input_ids.extend_from_slice(p.ids);
        for pos in p.start..ctx {
            b.positions.push(pos as u32);
            let blk = p.table[pos / BLOCK_SIZE] as usize;
            b.slot_mapping
                .push((blk * BLOCK_SIZE + pos % BLOCK_SIZE) as u32);
        }
    }
    m.forward_all_logits(&b).unwrap()
}

/// Every position's logits of `ids`, prefilled in chunks of `sizes` (the
/// last size repeats), in the scattered blocks `table`.
fn chunked(m: &mut DecoderLm, ids: &[u32], sizes: &[usize], table: &[u32]) -> Tensor {
    let mut out = Vec::new();
    let mut at = 0;
    let mut k = 0;
    while at < ids.len() {
        let n = sizes[k.min(sizes.len() - 1)].min(ids.len() - at);
        out.push(step(
            m,
            &[Part {
                ids: &ids[at..at + n],
                start: at,
                table,
            }],
        ));
        at += n;
        k += 1;
    }
    Tensor::cat(&out, 0).unwrap()
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let (r, _) = reference(&dir());
    let loaded = load_f32();
    assert_eq!(loaded.spec.architecture, "Gemma3ForCausalLM");
    for p in r["prompts"].as_array().unwrap() {
        let ids = loaded
            .tokenizer
            .encode(p["text"].as_str().unwrap(), true)
            .unwrap();
        assert_eq!(ids, ids_of(&p["input_ids"]), "{}", p["text"]);
    }
    let chat = &r["chat"];
    let rendered = loaded
        .require_chat_template()
        .unwrap()
        .render(
            chat["messages"].as_array().unwrap(),
            &ChatRenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    assert_eq!(
        loaded.tokenizer.encode(&rendered, false).unwrap(),
        ids_of(&chat["input_ids"])
    );
}

#[test]
fn logits_match_transformers_whole_and_chunked() {
    let (r, t) = reference(&dir());
    let p0 = ids_of(&r["prompts"][0]["input_ids"]);
    let p1 = ids_of(&r["prompts"][1]["input_ids"]);
    // Scattered, interleaved block tables.
    let table0: Vec<u32> = (0..8).map(|i| 2 * i + 1).collect();
    let table1: Vec<u32> = (0..8).map(|i| 30 - 2 * i).collect();
    let mut m = decoder(32);

    let whole0 = chunked(&mut m, &p0, &[p0.len()], &table0);
    // The reference keeps the first columns at every position, all at the last.
    let head = t["prompt0.logits"].dim(1).unwrap();
    let d = max_diff(&whole0.narrow(1, 0, head).unwrap(), &t["prompt0.logits"]);
    assert!(d <= ATOL, "prompt 0 logits at every position differ by {d}");
    let last0 = whole0.get(p0.len() - 1).unwrap();
    let d = d.max(max_diff(&last0, &t["prompt0.last_logits"]));
    assert!(d <= ATOL, "prompt 0 last logits differ by {d}");
    let whole1 = chunked(&mut m, &p1, &[p1.len()], &table1);
    let last1 = whole1.get(p1.len() - 1).unwrap();
    let d1 = max_diff(&last1, &t["prompt1.last_logits"]);
    assert!(d1 <= ATOL, "prompt 1 last logits differ by {d1}");
    eprintln!("gemma3-tiny: max |diff| logits prompt 0 {d:.2e}, prompt 1 {d1:.2e}");

    // Chunks: one token at a time (decode kernel, window sliding over block
    // edges), 3 (per-row kernel), 9 then 5 (tiled kernel, a chunk longer
    // than the window on a cached prefix).
    for sizes in [&[1][..], &[3], &[9, 5], &[2, 11]] {
        let got = chunked(&mut m, &p1, sizes, &table1);
        let d = max_diff(&got, &whole1);
        assert!(
            d <= 1e-5,
            "chunks {sizes:?}: logits differ from one prefill by {d}"
        );
    }

    // A ragged batch: prompt 0's prefill next to prompt 1's second chunk;
    // then a decode step of each. Each equals its run alone.
    let split = 11;
    step(
        &mut m,
        &[Part {
            ids: &p1[..split],
            start: 0,
            table: &table1,
        }],
    );
    let both = step(
        &mut m,
        &[
            Part {
                ids: &p0,
                start: 0,
                table: &table0,
            },
            Part {
                ids: &p1[split..],
                start: split,
                table: &table1,
            },
        ],
    );
    let n0 = p0.len();
    assert!(max_diff(&both.narrow(0, 0, n0).unwrap(), &whole0) <= 1e-5);
    assert!(
        max_diff(
            &both.narrow(0, n0, p1.len() - split).unwrap(),
            &whole1.narrow(0, split, p1.len() - split).unwrap()
        ) <= 1e-5
    );
}

/// Greedy ids of each prompt, all submitted at once, prefill in `chunk`-token steps.
fn run_engine(prompts: &[Vec<u32>], chunk: usize) -> Vec<Vec<u32>> {
    let LoadedModel {
        model,
        tokenizer,
        generation,
        ..
    } = load_f32();
    let cfg = EngineConfig {
        eos_token_ids: generation.eos_token_ids,
        max_num_batched_tokens: chunk,
        max_model_len: Some(128),
        block_size: BLOCK_SIZE,
        ..Default::default()
    };
    let engine = Engine::start(model, tokenizer, cfg).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 16,
        ignore_eos: true,
        ..Default::default()
    };
    let handles: Vec<_> = prompts
        .iter()
        .map(|ids| {
            engine
                .add_request(EngineRequest {
                    prompt_token_ids: ids.clone(),
                    params: params.clone(),
                    mm_items: Vec::new(),
                    mrope: None,
                })
                .unwrap()
        })
        .collect();
    handles.into_iter().map(drain_tokens).collect()
}

#[test]
fn greedy_ids_match_transformers_alone_and_batched() {
    let (r, _) = reference(&dir());
    let mut prompts: Vec<(Vec<u32>, Vec<u32>)> = r["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (ids_of(&p["input_ids"]), ids_of(&p["greedy_ids"])))
        .collect();
    prompts.push((
        ids_of(&r["chat"]["input_ids"]),
        ids_of(&r["chat"]["greedy_ids"]),
    ));
    for (ids, want) in &prompts {
        assert_eq!(&run_engine(std::slice::from_ref(ids), 5)[0], want, "alone");
    }
    let (ids, want): (Vec<_>, Vec<_>) = prompts.into_iter().unzip();
    assert_eq!(run_engine(&ids, 7), want, "batched");
}

/// Every layer a sliding-window layer (window 6, blocks of 4): a sequence
/// needs at most 3 blocks at a step once past its prompt, 4 with a 5-token
/// prefill chunk. A pool of 5 blocks (20 tokens) runs contexts of 47 to 61
/// tokens, alone and three at once (preempting), with the greedy ids of
/// transformers on the same configuration
/// (scripts/make_sliding_references.py). Without the freeing, the
/// engine would refuse the 21- and 27-token prompts outright.
#[test]
fn all_sliding_layers_free_blocks_behind_the_window_and_match_transformers() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("reference_all_sliding.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(r["sliding_window"], 6);
    let runs: Vec<(Vec<u32>, Vec<u32>)> = r["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (ids_of(&x["input_ids"]), ids_of(&x["greedy_ids"])))
        .collect();
    const POOL: usize = 5;
    let start = || {
        let m = decoder_with(|c| {
            let n = c["num_hidden_layers"].as_u64().unwrap() as usize;
            c["layer_types"] = serde_json::json!(vec!["sliding_attention"; n]);
        });
        assert_eq!(m.layer_windows(), vec![Some(6); 3]);
        let block_bytes = m.spec().kv_block_bytes(BLOCK_SIZE);
        let cfg = EngineConfig {
            kv_cache_bytes: Some(POOL * block_bytes),
            max_num_batched_tokens: 5,
            max_model_len: Some(128),
            block_size: BLOCK_SIZE,
            ..Default::default()
        };
        let engine = Engine::start(Box::new(m), load_f32().tokenizer, cfg).unwrap();
        assert_eq!(engine.num_kv_blocks(), POOL);
        engine
    };
    // The stats once the engine has published the step that finished
    // request number `n` (events go out before the step's stats do).
    let settled = |engine: &Engine, n: u64| loop {
        let st = engine.stats();
        if st.requests_finished >= n {
            return st;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let submit = |engine: &Engine, ids: &[u32], n: usize| {
        engine
            .add_request(EngineRequest {
                prompt_token_ids: ids.to_vec(),
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens: n,
                    ignore_eos: true,
                    ..Default::default()
                },
                mm_items: Vec::new(),
                mrope: None,
            })
            .unwrap()
    };

    // Alone: watch the blocks in use (the engine's stats, refreshed after
    // every step) while the context grows far past the pool.
    let engine = start();
    for (ids, want) in &runs {
        let mut h = submit(&engine, ids, want.len());
        let (mut got, mut peak) = (Vec::new(), 0);
        while let Some(ev) = h.events.blocking_recv() {
            peak = peak.max(engine.stats().kv_blocks_used);
            match ev {
                RequestEvent::Tokens { token_ids, .. } => got.extend(token_ids),
                RequestEvent::Error { message } => panic!("{message}"),
                RequestEvent::Finished { .. } => {}
            }
        }
        assert_eq!(&got, want, "alone, prompt of {}", ids.len());
        let context = ids.len() + want.len();
        assert!(peak <= 4, "{peak} blocks in use");
        eprintln!(
            "gemma3-tiny all sliding: {context} tokens ({} blocks) with at most {peak} blocks in use",
            context.div_ceil(BLOCK_SIZE)
        );
    }
    assert_eq!(settled(&engine, runs.len() as u64).kv_blocks_used, 0);

    // Together: 3 sequences of up to 3-4 blocks in 5 preempt each other.
    let engine = start();
    let handles: Vec<_> = runs
        .iter()
        .map(|(ids, want)| submit(&engine, ids, want.len()))
        .collect();
    let got: Vec<_> = handles.into_iter().map(drain_tokens).collect();
    let want: Vec<_> = runs.iter().map(|(_, w)| w.clone()).collect();
    assert_eq!(got, want, "batched");
    let st = settled(&engine, runs.len() as u64);
    assert!(st.preemptions > 0, "{st:?}");
    assert_eq!(st.kv_blocks_used, 0);
}
