//! End-to-end tests of the engine against the mock model.

use crate::detokenizer::tests::ByteDecoder;
use crate::engine_core::{CoreConfig, EngineCore};
use crate::scheduler::SchedulerConfig;
use crate::testing::{mock_block_bytes, MockModel, VOCAB};
use crate::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const BS: usize = 16;
const MAX_LEN: usize = 512;

#[derive(Debug, Clone, Default)]
struct SampleOut {
    tokens: Vec<u32>,
    text: String,
    pieces: Vec<String>,
    finish: Option<FinishReason>,
    stop_reason: Option<String>,
    usage: Option<(usize, usize, usize)>,
    logprobs: Vec<TokenLogprob>,
}

#[derive(Debug, Default)]
struct ReqOut {
    samples: Vec<SampleOut>,
    error: Option<String>,
}

impl ReqOut {
    fn tokens(&self) -> Vec<Vec<u32>> {
        self.samples.iter().map(|s| s.tokens.clone()).collect()
    }
    fn absorb(&mut self, ev: RequestEvent) {
        let sample = |s: &mut Vec<SampleOut>, i: usize| {
            if s.len() <= i {
                s.resize(i + 1, SampleOut::default());
            }
        };
        match ev {
            RequestEvent::Tokens {
                index,
                token_ids,
                text,
                logprobs,
            } => {
                sample(&mut self.samples, index);
                let s = &mut self.samples[index];
                assert!(s.finish.is_none(), "tokens after finish");
                s.tokens.extend(token_ids);
                s.text.push_str(&text);
                s.pieces.push(text);
                s.logprobs.extend(logprobs.unwrap_or_default());
            }
            RequestEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
            } => {
                sample(&mut self.samples, index);
                let s = &mut self.samples[index];
                assert!(s.finish.is_none(), "finished twice");
                s.finish = Some(reason);
                s.stop_reason = stop_reason;
                s.usage = Some((
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.cached_tokens,
                ));
            }
            RequestEvent::Error { message } => self.error = Some(message),
        }
    }
}

/// Read a request's events until its stream closes.
fn collect(rx: &mut UnboundedReceiver<RequestEvent>) -> ReqOut {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = ReqOut::default();
    loop {
        match rx.try_recv() {
            Ok(ev) => out.absorb(ev),
            Err(TryRecvError::Disconnected) => return out,
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "request did not finish in time");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn drain(rx: &mut UnboundedReceiver<RequestEvent>, out: &mut ReqOut) {
    while let Ok(ev) = rx.try_recv() {
        out.absorb(ev);
    }
}

fn config(num_blocks: usize, caching: bool) -> EngineConfig {
    EngineConfig {
        kv_cache_bytes: Some(num_blocks * mock_block_bytes(BS)),
        enable_prefix_caching: caching,
        ..EngineConfig::default()
    }
}

fn start(cfg: EngineConfig, model: MockModel) -> Engine {
    Engine::start(Box::new(model), Arc::new(ByteDecoder::standard()), cfg).unwrap()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 31 + i * 7 + i * i) % VOCAB as u32)
        .collect()
}

/// A request run on its own in a fresh engine with a large pool and no prefix cache.
fn alone(prompt: &[u32], params: &SamplingParams) -> ReqOut {
    let e = start(config(1000, false), MockModel::new(MAX_LEN));
    let mut h = e
        .add_request(EngineRequest::new(prompt.to_vec(), params.clone()))
        .unwrap();
    let out = collect(&mut h.events);
    assert!(out.error.is_none(), "{:?}", out.error);
    out
}

fn run_all(e: &Engine, reqs: &[(Vec<u32>, SamplingParams)]) -> Vec<ReqOut> {
    let mut handles: Vec<_> = reqs
        .iter()
        .map(|(p, s)| {
            e.add_request(EngineRequest::new(p.clone(), s.clone()))
                .unwrap()
        })
        .collect();
    handles.iter_mut().map(|h| collect(&mut h.events)).collect()
}

fn core(num_blocks: usize, budget: usize, caching: bool, model: MockModel) -> EngineCore {
    let mut model = model;
    model.allocate_kv_cache(num_blocks, BS).unwrap();
    let kv_window = crate::model::kv_window(&model.layer_windows());
    EngineCore::new(
        Box::new(model),
        Arc::new(ByteDecoder::standard()),
        CoreConfig {
            scheduler: SchedulerConfig {
                num_blocks,
                block_size: BS,
                max_num_seqs: 64,
                max_num_batched_tokens: budget,
                enable_prefix_caching: caching,
                encoder_budget: budget,
                whole_media_items: false,
                kv_window,
            },
            eos_token_ids: vec![],
            max_model_len: MAX_LEN,
            vocab_size: VOCAB,
            hidden_size: crate::testing::MOCK_HIDDEN,
            encoder_cache: Arc::new(std::sync::Mutex::new(
                crate::encoder_cache::EncoderCache::new(1024),
            )),
        },
    )
}

fn submit(
    core: &mut EngineCore,
    id: u64,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> UnboundedReceiver<RequestEvent> {
    let (tx, rx) = unbounded_channel();
    core.add_request(id, EngineRequest::new(prompt, params), tx);
    rx
}

#[test]
fn batched_prompts_get_the_same_tokens_as_alone_and_interleave() {
    let lens = [1usize, 5, 15, 16, 17, 33, 50];
    let reqs: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| (prompt(i as u32, l), greedy(20)))
        .collect();
    let expected: Vec<_> = reqs.iter().map(|(p, s)| alone(p, s).tokens()).collect();

    // Step the core by hand so all requests are in one batch from the start.
    let model = MockModel::new(MAX_LEN);
    let log = model.log.clone();
    let mut c = core(200, 2048, true, model);
    let mut rxs: Vec<_> = reqs
        .iter()
        .enumerate()
        .map(|(i, (p, s))| submit(&mut c, i as u64, p.clone(), s.clone()))
        .collect();
    assert!(c.step());
    // After one step every request has its first token: tokens interleave.
    let mut outs: Vec<ReqOut> = (0..reqs.len()).map(|_| ReqOut::default()).collect();
    for (rx, out) in rxs.iter_mut().zip(&mut outs) {
        drain(rx, out);
        assert_eq!(out.samples[0].tokens.len(), 1);
    }
    while c.step() {
        for (rx, out) in rxs.iter_mut().zip(&mut outs) {
            drain(rx, out);
        }
    }
    for (rx, out) in rxs.iter_mut().zip(&mut outs) {
        drain(rx, out);
    }
    for (i, out) in outs.iter().enumerate() {
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.tokens(), expected[i], "prompt {i} (len {})", lens[i]);
        assert_eq!(out.samples[0].finish, Some(FinishReason::Length));
        assert_eq!(out.samples[0].usage, Some((lens[i], 20, 0)));
    }
    // 20 steps: one prefill (+ first token) then 19 decodes, all sequences together.
    let log = log.lock().unwrap();
    assert_eq!(log.batch_seqs.len(), 20);
    assert!(log.batch_seqs.iter().all(|&n| n == lens.len()));
    assert_eq!(c.stats().kv_blocks_used, 0);

    // The threaded engine gives the same.
    let e = start(config(200, true), MockModel::new(MAX_LEN));
    let outs = run_all(&e, &reqs);
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.tokens(), expected[i]);
    }
    // Different prompts really give different outputs (the test can fail).
    assert_ne!(expected[0], expected[1]);
}

#[test]
fn prefix_cache_hit_gives_same_tokens_and_counts_hits() {
    let e = start(config(100, true), MockModel::new(MAX_LEN));
    let p = prompt(3, 40);
    let params = greedy(12);
    let first = run_all(&e, &[(p.clone(), params.clone())]).remove(0);
    let s0 = e.stats();
    assert_eq!(s0.prefix_cache_hits, 0);
    assert_eq!(s0.prefix_cache_queries, 40);
    assert_eq!(first.samples[0].usage, Some((40, 12, 0)));

    let second = run_all(&e, &[(p.clone(), params.clone())]).remove(0);
    assert_eq!(second.tokens(), first.tokens());
    let s1 = e.stats();
    // 40 tokens: two full blocks (32 tokens) served from the cache.
    assert_eq!(s1.prefix_cache_hits, 32);
    assert_eq!(second.samples[0].usage, Some((40, 12, 32)));

    // A prompt that is exactly two full blocks still recomputes its last token.
    let p32: Vec<u32> = p[..32].to_vec();
    let got = run_all(&e, &[(p32.clone(), params.clone())]).remove(0);
    assert_eq!(got.tokens(), alone(&p32, &params).tokens());
    assert_eq!(e.stats().prefix_cache_hits, 32 + 16);

    // Same first block, different second: only one block hits.
    let mut q = p.clone();
    q[20] = (q[20] + 1) % VOCAB as u32;
    let got = run_all(&e, &[(q.clone(), params.clone())]).remove(0);
    assert_eq!(got.tokens(), alone(&q, &params).tokens());
    assert_ne!(got.tokens(), first.tokens());
    assert_eq!(e.stats().prefix_cache_hits, 32 + 16 + 16);

    // Generated tokens are cached too: prompt + output of the first run as a new prompt.
    let mut continued = p.clone();
    continued.extend(&first.samples[0].tokens);
    let before = e.stats().prefix_cache_hits;
    let got = run_all(&e, &[(continued.clone(), params.clone())]).remove(0);
    assert_eq!(got.tokens(), alone(&continued, &params).tokens());
    // 52 tokens, 3 full blocks; the first run computed 40 + 11 = 51 tokens of KV -> 3 blocks cached.
    assert_eq!(e.stats().prefix_cache_hits - before, 48);
    assert_eq!(e.stats().kv_blocks_used, 0);
}

#[test]
fn multimodal_keys_separate_cache_entries() {
    let e = start(config(100, true), MockModel::new(MAX_LEN));
    let p = prompt(4, 40);
    let req = |hash: &str| EngineRequest {
        prompt_token_ids: p.clone(),
        params: greedy(2),
        mm_items: vec![item(
            hash,
            18,
            4,
            MmInput::Features(media(hash.len() as f32, 4)),
        )],
        mrope: None,
    };
    for (hash, expected_hits) in [("img-a", 0u64), ("img-a", 32), ("img-b", 16)] {
        let before = e.stats().prefix_cache_hits;
        let mut h = e.add_request(req(hash)).unwrap();
        let out = collect(&mut h.events);
        assert!(out.error.is_none());
        assert_eq!(
            e.stats().prefix_cache_hits - before,
            expected_hits,
            "{hash}"
        );
    }
    // Out-of-range media is rejected.
    let mut bad = req("x");
    bad.mm_items[0].placeholder.offset = 39;
    assert!(e.add_request(bad).unwrap_err().is_invalid_request());
}

fn preemption_case(caching: bool) {
    let reqs: Vec<_> = (0..8)
        .map(|i| (prompt(10 + i, 18 + i as usize), greedy(40)))
        .collect();
    let expected: Vec<_> = reqs.iter().map(|(p, s)| alone(p, s).tokens()).collect();
    let e = start(config(10, caching), MockModel::new(MAX_LEN));
    assert_eq!(e.num_kv_blocks(), 10);
    let outs = run_all(&e, &reqs);
    for (i, out) in outs.iter().enumerate() {
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.tokens(), expected[i], "request {i}");
        assert_eq!(out.samples[0].tokens.len(), 40);
        // Output kept across preemption, never re-emitted.
        assert_eq!(out.samples[0].usage.map(|u| u.1), Some(40));
    }
    let st = e.stats();
    assert!(st.preemptions > 0, "{st:?}");
    assert_eq!(st.kv_blocks_used, 0);
    assert_eq!(st.requests_finished, 8);
    assert_eq!(st.generation_tokens, 8 * 40);
}

#[test]
fn tiny_pool_preempts_and_every_request_completes_identically() {
    preemption_case(true);
    preemption_case(false);
}

#[test]
fn a_request_is_counted_before_its_final_event() {
    // A client that saw its request end and then reads the stats (/metrics)
    // must find the request's tokens there.
    let mut c = core(100, 2048, false, MockModel::new(MAX_LEN));
    let published = c.published_stats();
    for (id, (max_tokens, abort)) in [(3, false), (4, false), (5, true)].into_iter().enumerate() {
        let before = published.lock().unwrap().clone();
        let mut rx = submit(&mut c, id as u64, prompt(id as u32, 7), greedy(max_tokens));
        let mut out = ReqOut::default();
        let emitted = |o: &ReqOut| o.samples.first().map_or(0, |s| s.tokens.len());
        while out.samples.first().is_none_or(|s| s.finish.is_none()) {
            if abort && emitted(&out) == 2 {
                c.abort_request(id as u64);
            } else {
                c.step();
            }
            drain(&mut rx, &mut out);
        }
        let now = published.lock().unwrap().clone();
        assert_eq!(now.requests_finished, before.requests_finished + 1);
        assert_eq!(
            now.generation_tokens - before.generation_tokens,
            emitted(&out) as u64
        );
        assert_eq!(now.kv_blocks_used, 0);
    }
}

#[test]
fn chunked_prefill_matches_unchunked() {
    let p = prompt(5, 150);
    let params = greedy(10);
    let expected = alone(&p, &params).tokens();
    let model = MockModel::new(MAX_LEN);
    let log = model.log.clone();
    let mut cfg = config(100, true);
    cfg.max_num_batched_tokens = 32;
    let e = start(cfg, model);
    // Two requests so chunks of one share steps with decodes of the other.
    let short = prompt(6, 5);
    let outs = run_all(
        &e,
        &[(p.clone(), params.clone()), (short.clone(), greedy(30))],
    );
    assert_eq!(outs[0].tokens(), expected);
    assert_eq!(outs[1].tokens(), alone(&short, &greedy(30)).tokens());
    let log = log.lock().unwrap();
    assert!(
        log.batch_tokens.iter().all(|&t| t <= 32),
        "{:?}",
        log.batch_tokens
    );
    // 150 prompt tokens in chunks of at most 32: at least 5 prefill steps.
    assert!(log.batch_tokens.iter().filter(|&&t| t >= 30).count() >= 4);
}

#[test]
fn abort_frees_all_blocks_and_reports_abort() {
    let mut model = MockModel::new(MAX_LEN);
    model.delay = Some(Duration::from_millis(2));
    let e = start(config(100, true), model);
    let mut h = e
        .add_request(EngineRequest::new(prompt(1, 60), greedy(400)))
        .unwrap();
    // Wait until it is generating.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = ReqOut::default();
    while out.samples.first().map_or(0, |s| s.tokens.len()) < 3 {
        assert!(Instant::now() < deadline);
        drain(&mut h.events, &mut out);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(e.stats().kv_blocks_used > 0);
    e.abort(h.id);
    let rest = collect(&mut h.events);
    let last = rest.samples.first().cloned().unwrap_or_default();
    assert_eq!(last.finish, Some(FinishReason::Abort));
    assert!(last.usage.unwrap().1 >= 3);
    wait_for(|| e.stats().kv_blocks_used == 0 && e.stats().running == 0);
    assert_eq!(e.stats().kv_blocks_free, e.num_kv_blocks());

    // Dropping the receiver aborts too.
    let h2 = e
        .add_request(EngineRequest::new(prompt(2, 60), greedy(400)))
        .unwrap();
    wait_for(|| e.stats().kv_blocks_used > 0);
    drop(h2);
    wait_for(|| e.stats().kv_blocks_used == 0 && e.stats().requests_finished == 2);
    // Aborting an unknown id is harmless.
    e.abort(12345);
    let ok = run_all(&e, &[(prompt(3, 4), greedy(3))]).remove(0);
    assert_eq!(ok.samples[0].tokens.len(), 3);
}

fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn n_samples_share_prompt_blocks_and_reproduce_with_seed() {
    let p = prompt(7, 40); // 2 full blocks + 8 tokens
    let sampled = |seed: u64, n: usize, caching: bool| {
        let e = start(config(100, caching), MockModel::new(MAX_LEN));
        let params = SamplingParams {
            n,
            seed: Some(seed),
            max_tokens: 12,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let out = run_all(&e, &[(p.clone(), params)]).remove(0);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(e.stats().kv_blocks_used, 0);
        out.tokens()
    };
    for caching in [false, true] {
        let a = sampled(42, 3, caching);
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|s| s.len() == 12));
        assert_eq!(a, sampled(42, 3, caching), "same seed reproduces");
        assert_ne!(a, sampled(43, 3, caching), "another seed differs");
        assert!(
            a[0] != a[1] || a[1] != a[2],
            "samples differ from each other"
        );
        // Sample 0 of n = 3 is the n = 1 request with the same seed.
        assert_eq!(a[0], sampled(42, 1, caching)[0]);
    }

    // Greedy samples all equal the single greedy output: the forks' shared
    // blocks and recomputed partial block are right.
    let expected = alone(&p, &greedy(12)).tokens().remove(0);
    let e = start(config(100, false), MockModel::new(MAX_LEN));
    let params = SamplingParams { n: 4, ..greedy(12) };
    let out = run_all(&e, &[(p.clone(), params)]).remove(0);
    assert_eq!(out.tokens(), vec![expected; 4]);
    for s in &out.samples {
        assert_eq!(s.finish, Some(FinishReason::Length));
        assert_eq!(s.usage, Some((40, 12, 0)));
    }
}

#[test]
fn n_samples_share_blocks_in_the_pool() {
    for caching in [false, true] {
        let mut c = core(100, 2048, caching, MockModel::new(MAX_LEN));
        let params = SamplingParams {
            n: 3,
            seed: Some(1),
            max_tokens: 20,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let mut rx = submit(&mut c, 1, prompt(8, 40), params);
        assert!(c.step()); // prefill + fork
        assert_eq!(c.stats().running, 3);
        assert!(c.step()); // forks recompute their 8 partial-block prompt tokens
                           // Parent: 3 blocks; each fork: the 2 shared + 1 own. Unshared would be 9.
        assert_eq!(c.stats().kv_blocks_used, 5, "caching = {caching}");
        let table = |i: usize| {
            c.scheduler()
                .block_table(c.scheduler().running()[i])
                .to_vec()
        };
        assert_eq!(table(0)[..2], table(1)[..2]);
        assert_eq!(table(0)[..2], table(2)[..2]);
        assert_ne!(table(1)[2], table(2)[2]);
        while c.step() {}
        let mut out = ReqOut::default();
        drain(&mut rx, &mut out);
        assert_eq!(out.samples.len(), 3);
        assert!(out
            .samples
            .iter()
            .all(|s| s.tokens.len() == 20 && s.finish == Some(FinishReason::Length)));
        assert_eq!(c.stats().kv_blocks_used, 0);
    }
}

/// Byte strings of ByteDecoder::standard: a..z = 0..25, ' ' = 26, € = 27 28 29.
fn ids(s: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for ch in s.chars() {
        match ch {
            'a'..='z' => v.push(ch as u32 - 'a' as u32),
            ' ' => v.push(26),
            '€' => v.extend([27, 28, 29]),
            _ => panic!("no token for {ch}"),
        }
    }
    v
}

fn scripted(prompt_len: usize, output: &[u32]) -> MockModel {
    let mut m = MockModel::new(MAX_LEN);
    let mut script = vec![0u32; prompt_len];
    script.extend_from_slice(output);
    m.script = Some(script);
    m
}

#[test]
fn stop_strings_are_never_emitted_nor_split() {
    let p = prompt(9, 5);
    let full = "price €x ok € now stop";
    let out_ids = ids(full);
    let cases = [
        ("€ now", "price €x ok "),
        ("€", "price "),
        ("ok", "price €x "),
        ("w s", "price €x ok € no"),
        ("zzz", full),
    ];
    for (stop, expected) in cases {
        let e = start(config(100, true), scripted(p.len(), &out_ids));
        let params = SamplingParams {
            stop: vec![stop.into()],
            ..greedy(out_ids.len())
        };
        let out = run_all(&e, &[(p.clone(), params)]).remove(0);
        let s = &out.samples[0];
        assert_eq!(s.text, expected, "stop {stop:?}");
        assert!(
            s.pieces.iter().all(|x| !x.contains('\u{FFFD}')),
            "{:?}",
            s.pieces
        );
        if expected != full {
            assert_eq!(s.finish, Some(FinishReason::Stop));
            assert_eq!(s.stop_reason.as_deref(), Some(stop));
        } else {
            assert_eq!(s.finish, Some(FinishReason::Length));
            assert_eq!(s.tokens, out_ids);
        }
    }
}

#[test]
fn eos_stop_tokens_and_min_tokens() {
    let p = prompt(11, 4);
    // Script: "ab" then EOS (id 40), then "cd" then stop token 41, then "e".
    let script = [0u32, 1, 40, 2, 3, 41, 4, 5, 6, 7];
    let mut cfg = config(100, true);
    cfg.eos_token_ids = vec![40];
    let run = |params: SamplingParams| {
        let e = start(cfg.clone(), scripted(p.len(), &script));
        run_all(&e, &[(p.clone(), params)])
            .remove(0)
            .samples
            .remove(0)
    };
    let base = SamplingParams {
        temperature: 0.0,
        max_tokens: 10,
        stop_token_ids: vec![41],
        ..SamplingParams::default()
    };
    let s = run(base.clone());
    assert_eq!(s.tokens, vec![0, 1, 40]);
    assert_eq!(s.text, "ab");
    assert_eq!(
        (s.finish, s.stop_reason.clone()),
        (Some(FinishReason::Stop), None)
    );
    // ignore_eos: runs on to the stop token, reported as the stop reason.
    let s = run(SamplingParams {
        ignore_eos: true,
        ..base.clone()
    });
    assert_eq!(s.tokens, vec![0, 1, 40, 2, 3, 41]);
    assert_eq!(s.stop_reason.as_deref(), Some("41"));
    assert_eq!(s.usage.map(|u| u.1), Some(6));
    // min_tokens: EOS suppressed for the first 4 outputs (another token is chosen).
    let s = run(SamplingParams {
        min_tokens: 4,
        ..base.clone()
    });
    assert_ne!(s.tokens[2], 40);
    assert!(s.tokens.len() >= 4);
    assert!(!s.tokens[..4].contains(&40) && !s.tokens[..4].contains(&41));
    // max_tokens.
    let s = run(SamplingParams {
        max_tokens: 2,
        ..base
    });
    assert_eq!(
        (s.tokens.clone(), s.finish),
        (vec![0, 1], Some(FinishReason::Length))
    );
}

#[test]
fn logprobs_are_reported_per_token() {
    let e = start(config(100, true), MockModel::new(MAX_LEN));
    let params = SamplingParams {
        logprobs: Some(3),
        ..greedy(5)
    };
    let out = run_all(&e, &[(prompt(12, 9), params)]).remove(0);
    let s = &out.samples[0];
    assert_eq!(s.logprobs.len(), 5);
    for (lp, &t) in s.logprobs.iter().zip(&s.tokens) {
        assert_eq!(lp.token_id, t);
        assert_eq!(lp.top.len(), 3);
        // Greedy: the chosen token is the top alternative.
        assert_eq!(lp.top[0].token_id, t);
        assert!(lp.logprob <= 0.0 && lp.logprob == lp.top[0].logprob);
    }
}

#[test]
fn validation_errors_are_synchronous_and_clear() {
    let mut cfg = config(4, true); // 64 tokens of KV
    cfg.max_model_len = Some(100);
    let e = start(cfg, MockModel::new(MAX_LEN));
    assert_eq!(e.max_model_len(), 100);
    let add = |p: Vec<u32>, params: SamplingParams| {
        e.add_request(EngineRequest::new(p, params)).unwrap_err()
    };
    let err = add(prompt(1, 90), greedy(20));
    assert_eq!(
        err.to_string(),
        "This model's maximum context length is 100 tokens. However, you requested 110 tokens (90 in the prompt, 20 for the completion). Please reduce the length of the prompt or completion."
    );
    assert!(matches!(
        add(prompt(1, 100), greedy(1)),
        EngineError::ContextLength { .. }
    ));
    assert!(add(vec![], greedy(1))
        .to_string()
        .contains("at least one token"));
    assert!(add(vec![1, VOCAB as u32], greedy(1))
        .to_string()
        .contains("out of range"));
    assert!(add(
        prompt(1, 4),
        SamplingParams {
            top_p: 0.0,
            ..greedy(1)
        }
    )
    .to_string()
    .contains("topP"));
    assert!(add(prompt(1, 4), SamplingParams { n: 65, ..greedy(1) })
        .to_string()
        .contains("max_num_seqs"));
    // Fits the context window but never the 64-token pool.
    let err = add(prompt(1, 70), greedy(2));
    assert!(
        err.is_invalid_request() && err.to_string().contains("KV cache"),
        "{err}"
    );
    // Config errors.
    let bad = EngineConfig {
        max_model_len: Some(MAX_LEN + 1),
        ..config(4, true)
    };
    assert!(matches!(
        Engine::start(
            Box::new(MockModel::new(MAX_LEN)),
            Arc::new(ByteDecoder::standard()),
            bad
        ),
        Err(EngineError::InvalidConfig(_))
    ));
    let bad = EngineConfig {
        kv_cache_bytes: Some(1),
        ..EngineConfig::default()
    };
    assert!(Engine::start(
        Box::new(MockModel::new(MAX_LEN)),
        Arc::new(ByteDecoder::standard()),
        bad
    )
    .is_err());
}

#[test]
fn a_sequence_outgrowing_the_pool_fails_with_an_error_event() {
    // Bypass validation: a prompt larger than the pool, and one that outgrows it.
    let mut c = core(2, 2048, true, MockModel::new(MAX_LEN));
    let mut big = submit(&mut c, 1, prompt(1, 40), greedy(5));
    let mut grows = submit(&mut c, 2, prompt(2, 30), greedy(10));
    let mut steps = 0;
    while c.step() {
        steps += 1;
        assert!(steps < 50, "looping");
    }
    let (mut a, mut b) = (ReqOut::default(), ReqOut::default());
    drain(&mut big, &mut a);
    drain(&mut grows, &mut b);
    assert!(
        a.error.as_deref().unwrap_or("").contains("KV cache blocks"),
        "{:?}",
        a.error
    );
    assert!(b.error.is_some());
    // KV for 30 + 2 tokens fills both blocks; the 3rd sample then cannot be computed.
    assert_eq!(b.samples[0].tokens.len(), 3);
    assert_eq!(c.stats().kv_blocks_used, 0);
}

#[test]
fn model_errors_fail_the_batch_and_the_engine_keeps_going() {
    let mut model = MockModel::new(MAX_LEN);
    model.fail_on_token = Some(63);
    let e = start(config(100, true), model);
    let mut bad_prompt = prompt(1, 10);
    bad_prompt[3] = 63;
    let out = run_all(&e, &[(bad_prompt, greedy(5))]).remove(0);
    assert!(
        out.error.as_deref().unwrap_or("").contains("mock failure"),
        "{:?}",
        out.error
    );
    assert_eq!(e.stats().kv_blocks_used, 0);
    let p = prompt(2, 10);
    let good = run_all(&e, &[(p.clone(), greedy(5))]).remove(0);
    assert!(good.error.is_none());
    assert_eq!(good.tokens(), alone(&p, &greedy(5)).tokens());
}

#[test]
fn shutdown_aborts_pending_and_rejects_new_requests() {
    let mut model = MockModel::new(MAX_LEN);
    model.delay = Some(Duration::from_millis(1));
    let e = start(config(100, true), model);
    let mut h = e
        .add_request(EngineRequest::new(prompt(1, 20), greedy(480)))
        .unwrap();
    e.shutdown();
    let out = collect(&mut h.events);
    let s = &out.samples[0];
    assert_eq!(s.finish, Some(FinishReason::Abort), "{s:?}");
    assert!(s.tokens.len() < 480);
    assert!(matches!(
        e.add_request(EngineRequest::new(prompt(1, 4), greedy(1))),
        Err(EngineError::Shutdown)
    ));
    e.shutdown(); // idempotent
}

#[test]
fn engine_is_send_sync_and_defaults_are_sane() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    let d = EngineConfig::default();
    assert_eq!(
        (
            d.block_size,
            d.max_num_seqs,
            d.max_num_batched_tokens,
            d.enable_prefix_caching
        ),
        (16, 64, 2048, true)
    );
    // Default sizing never exceeds what max_num_seqs * max_model_len need.
    let e = start(EngineConfig::default(), MockModel::new(MAX_LEN));
    assert!(e.num_kv_blocks() <= 64 * MAX_LEN / 16);
    assert!(e.num_kv_blocks() > 0);
    assert_eq!(e.stats().kv_blocks_total, e.num_kv_blocks());
}

// ---- media items ---------------------------------------------------------

/// Mock media: `len` embedding rows whose first column encodes `value`.
fn media(value: f32, len: usize) -> Arc<MmFeatures> {
    let rows: Vec<f32> = (0..len).flat_map(|i| [value + i as f32, 0.0]).collect();
    let t = candle_core::Tensor::from_vec(
        rows,
        (len, crate::testing::MOCK_HIDDEN),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    Arc::new(MmFeatures {
        tensors: vec![("mock_media".into(), t)],
    })
}

fn item(hash: &str, offset: usize, length: usize, input: MmInput) -> MmItem {
    MmItem {
        placeholder: MmPlaceholder {
            hash: hash.into(),
            offset,
            length,
        },
        input,
    }
}

fn with_media(prompt: &[u32], items: Vec<MmItem>) -> EngineRequest {
    EngineRequest {
        prompt_token_ids: prompt.to_vec(),
        params: greedy(12),
        mm_items: items,
        mrope: None,
    }
}

fn run_one(e: &Engine, req: EngineRequest) -> ReqOut {
    let mut h = e.add_request(req).unwrap();
    let out = collect(&mut h.events);
    assert!(out.error.is_none(), "{:?}", out.error);
    out
}

#[test]
fn media_embeddings_reach_the_model_and_the_encoder_cache_skips_the_encoder() {
    let model = MockModel::new(MAX_LEN);
    let log = model.log.clone();
    let e = start(config(200, true), model);
    let p = prompt(3, 40);
    let a = run_one(
        &e,
        with_media(
            &p,
            vec![item("img-a", 5, 20, MmInput::Features(media(1.0, 20)))],
        ),
    );
    assert_eq!(log.lock().unwrap().encodes, 1);
    // The same item again: the prefix cache and the encoder cache both hit.
    let again = run_one(
        &e,
        with_media(
            &p,
            vec![item("img-a", 5, 20, MmInput::Features(media(1.0, 20)))],
        ),
    );
    assert_eq!(again.tokens(), a.tokens());
    assert_eq!(
        log.lock().unwrap().encodes,
        1,
        "a known item must not be encoded again"
    );
    // Other text before the same image: the prefix cache misses, the encoder cache hits.
    let mut p2 = p.clone();
    p2[0] = (p2[0] + 1) % VOCAB as u32;
    run_one(
        &e,
        with_media(
            &p2,
            vec![item("img-a", 5, 20, MmInput::Features(media(1.0, 20)))],
        ),
    );
    assert_eq!(log.lock().unwrap().encodes, 1);
    assert_eq!(
        (
            e.stats().encoder_cache_queries,
            e.stats().encoder_cache_hits
        ),
        (2, 1)
    );
    // Same text, different image: different output, and no KV reuse past the image.
    let b = run_one(
        &e,
        with_media(
            &p,
            vec![item("img-b", 5, 20, MmInput::Features(media(9.0, 20)))],
        ),
    );
    assert_ne!(b.tokens(), a.tokens());
    assert_eq!(log.lock().unwrap().encodes, 2);
    assert_eq!(
        b.samples[0].usage.unwrap().2,
        0,
        "the first block already holds media: nothing to reuse"
    );
    // Text alone differs from text with media.
    let plain = run_one(&e, EngineRequest::new(p.clone(), greedy(12)));
    assert_ne!(plain.tokens(), a.tokens());
    let st = e.stats();
    assert_eq!(
        (
            st.encoder_runs,
            st.encoder_cache_items,
            st.encoder_cache_tokens
        ),
        (2, 2, 40)
    );
    assert_eq!(
        (st.encoder_cache_queries, st.encoder_cache_hits),
        (3, 1),
        "{st:?}"
    );
}

#[test]
fn a_reference_only_item_reuses_the_cached_output_or_is_refused() {
    let e = start(config(200, false), MockModel::new(MAX_LEN));
    let p = prompt(4, 30);
    let full = run_one(
        &e,
        with_media(
            &p,
            vec![item("sku-1", 2, 10, MmInput::Features(media(3.0, 10)))],
        ),
    );
    let by_ref = run_one(
        &e,
        with_media(&p, vec![item("sku-1", 2, 10, MmInput::Cached)]),
    );
    assert_eq!(by_ref.tokens(), full.tokens());
    let err = e
        .add_request(with_media(&p, vec![item("sku-2", 2, 10, MmInput::Cached)]))
        .unwrap_err();
    assert!(
        err.is_invalid_request() && err.to_string().contains("sku-2"),
        "{err}"
    );
}

#[test]
fn chunked_prefill_splits_an_item_without_changing_the_result() {
    let p = prompt(5, 60);
    let req = || {
        with_media(
            &p,
            vec![
                item("m", 3, 40, MmInput::Features(media(2.0, 40))),
                item("n", 50, 6, MmInput::Features(media(7.0, 6))),
            ],
        )
    };
    let whole = run_one(&start(config(200, false), MockModel::new(MAX_LEN)), req());
    let cfg = EngineConfig {
        max_num_batched_tokens: 7,
        ..config(200, false)
    };
    let model = MockModel::new(MAX_LEN);
    let log = model.log.clone();
    let chunked = run_one(&start(cfg, model), req());
    assert_eq!(chunked.tokens(), whole.tokens());
    assert!(log.lock().unwrap().batch_tokens.iter().all(|&n| n <= 7));
    assert_eq!(log.lock().unwrap().encodes, 2);
}

#[test]
fn bad_media_items_are_refused_or_fail_only_their_request() {
    let e = start(config(200, false), MockModel::new(MAX_LEN));
    let p = prompt(6, 20);
    let wrong =
        candle_core::Tensor::zeros((4, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let err = e
        .add_request(with_media(
            &p,
            vec![item("e", 0, 5, MmInput::Embeddings(wrong))],
        ))
        .unwrap_err();
    assert!(
        err.to_string().contains("[5, 2]") && err.to_string().contains("[4, 3]"),
        "{err}"
    );
    let err = e
        .add_request(with_media(
            &p,
            vec![
                item("a", 0, 5, MmInput::Cached),
                item("b", 4, 2, MmInput::Cached),
            ],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    // An encoder error (the mock wants a mock_media tensor) fails that request only.
    let bad = Arc::new(MmFeatures { tensors: vec![] });
    let mut h = e
        .add_request(with_media(
            &p,
            vec![item("x", 1, 3, MmInput::Features(bad))],
        ))
        .unwrap();
    let out = collect(&mut h.events);
    assert!(
        out.error
            .as_deref()
            .unwrap_or("")
            .contains("media encoder failed"),
        "{:?}",
        out.error
    );
    run_one(&e, EngineRequest::new(p.clone(), greedy(4)));
    // Precomputed embeddings of the right shape work like encoded ones.
    let emb = media(3.0, 5).get("mock_media").unwrap().clone();
    let direct = run_one(
        &e,
        with_media(&p, vec![item("e2", 0, 5, MmInput::Embeddings(emb))]),
    );
    let encoded = run_one(
        &e,
        with_media(&p, vec![item("e3", 0, 5, MmInput::Features(media(3.0, 5)))]),
    );
    assert_eq!(direct.tokens(), encoded.tokens());
}

#[test]
fn mrope_positions_reach_the_model_and_continue_at_index_plus_delta() {
    let model = MockModel::new(MAX_LEN);
    let log = model.log.clone();
    let e = start(config(100, false), model);
    let p = prompt(7, 10);
    // Tokens 3..7 form a 2x2 "image" at temporal 3: positions compress by 2.
    let mut pos: Vec<[u32; 3]> = (0..3).map(|i| [i, i, i]).collect();
    pos.extend([[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]]);
    pos.extend((5..8).map(|i| [i, i, i]));
    let delta = 8 - 10;
    let req = |pos: Vec<[u32; 3]>| EngineRequest {
        prompt_token_ids: p.clone(),
        params: greedy(3),
        mm_items: vec![],
        mrope: Some(crate::request::MropePositions {
            prompt: pos.into(),
            delta,
        }),
    };
    let a = run_one(&e, req(pos.clone()));
    let seen = log.lock().unwrap().mrope.clone();
    assert_eq!(&seen[..10], &pos[..]);
    // Decode steps: the 2 sampled tokens fed back sit at index + delta = 8, 9.
    assert_eq!(&seen[10..], &[[8, 8, 8], [9, 9, 9]]);
    let mut other = pos.clone();
    other[4] = [3, 9, 9];
    assert_ne!(
        run_one(&e, req(other)).tokens(),
        a.tokens(),
        "positions change the result"
    );
    let err = e.add_request(req(pos[..9].to_vec())).unwrap_err();
    assert!(
        err.to_string().contains("M-RoPE positions cover 9 tokens"),
        "{err}"
    );
}

fn windowed(window: usize) -> MockModel {
    let mut m = MockModel::new(MAX_LEN);
    m.window = Some(window);
    m
}

/// A sliding window of 20 over blocks of 16: a sequence holds at most 3
/// blocks however long it grows. The mock reads only its window's keys, and
/// its tokens equal the full-context run's (they do not depend on the window).
#[test]
fn a_sliding_window_bounds_the_blocks_a_long_sequence_holds() {
    let p = prompt(4, 100);
    let params = greedy(60);
    let expected = alone(&p, &params).tokens();
    // 4 blocks = 64 tokens < 160; chunks of the prompt are cut to the pool.
    let mut c = core(4, 2048, true, windowed(20));
    let mut rx = submit(&mut c, 1, p.clone(), params.clone());
    let (mut out, mut steps, mut peak_decoding) = (ReqOut::default(), 0, 0);
    while c.step() {
        steps += 1;
        drain(&mut rx, &mut out);
        let used = c.stats().kv_blocks_used;
        assert!(used <= 4);
        if !out.samples.is_empty() {
            peak_decoding = peak_decoding.max(used);
        }
        assert!(steps < 200, "looping");
    }
    drain(&mut rx, &mut out);
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.tokens(), expected);
    assert_eq!(peak_decoding, 3);
    assert_eq!(c.stats().kv_blocks_used, 0);

    // The engine admits the prompt the pool could not hold whole; a model
    // without a window is refused it.
    let e = start(config(4, true), windowed(20));
    let outs = run_all(&e, &[(p.clone(), params.clone())]);
    assert_eq!(outs[0].tokens(), expected);
    let full = start(config(4, true), MockModel::new(MAX_LEN));
    let err = full.add_request(EngineRequest::new(p, params)).unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
}

/// Many long requests in a pool far too small for their contexts: they
/// preempt each other, resume, hit the prefix cache (window blocks only),
/// and all finish with the full-context tokens.
#[test]
fn a_sliding_window_survives_preemption_and_prefix_hits() {
    for caching in [true, false] {
        let mut reqs: Vec<_> = (0..6)
            .map(|i| (prompt(20 + i, 8 + 5 * i as usize), greedy(60)))
            .collect();
        // A repeated prompt: its second run may start from cached blocks.
        reqs.push(reqs[3].clone());
        let expected: Vec<_> = reqs.iter().map(|(p, s)| alone(p, s).tokens()).collect();
        // Submitted together, stepped by hand: the same schedule every run.
        let mut c = core(5, 2048, caching, windowed(24));
        let mut rxs: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, (p, s))| submit(&mut c, i as u64, p.clone(), s.clone()))
            .collect();
        let mut steps = 0;
        while c.step() {
            steps += 1;
            assert!(steps < 2000, "looping");
            assert!(c.stats().kv_blocks_used <= 5);
        }
        for (i, rx) in rxs.iter_mut().enumerate() {
            let mut out = ReqOut::default();
            drain(rx, &mut out);
            assert!(out.error.is_none(), "{:?}", out.error);
            assert_eq!(out.tokens(), expected[i], "request {i}");
        }
        let st = c.stats();
        assert!(st.preemptions > 0, "{st:?}");
        assert_eq!(st.kv_blocks_used, 0);
        assert_eq!(st.requests_finished, reqs.len() as u64);
    }
    // Sequential runs of one prompt: the second is served from the cache.
    let e = start(config(8, true), windowed(24));
    let p = prompt(9, 90);
    let first = run_all(&e, &[(p.clone(), greedy(5))]).remove(0);
    let second = run_all(&e, &[(p.clone(), greedy(5))]).remove(0);
    assert_eq!(first.tokens(), second.tokens());
    assert_eq!(first.tokens(), alone(&p, &greedy(5)).tokens());
    // 90 tokens: the hit covers 5 blocks, of which only the last two are held.
    assert_eq!(second.samples[0].usage.map(|u| u.2), Some(80));
}
