//! The engine's side of `Model::sample_on_device`: which rows it hands to the
//! device, the uniform draw each gets from its sequence's generator, and that
//! the other rows (logprobs, penalties) are still sampled on the host.

use crate::detokenizer::tests::ByteDecoder;
use crate::model::{DeviceSampleRow, ForwardBatch, Model, ModelSpec};
use crate::sampler::{self, sample_rng};
use crate::testing::{mock_block_bytes, MockModel};
use crate::*;
use candle_core::Tensor;
use rand::RngExt;
use std::sync::{Arc, Mutex};

/// The mock model, "sampling on its device" with the host sampler's own
/// functions and recording every row it was asked for.
struct DeviceMock {
    inner: MockModel,
    asked: Arc<Mutex<Vec<DeviceSampleRow>>>,
}

fn device_choice(raw: &[f32], r: &DeviceSampleRow) -> u32 {
    if r.temperature < sampler::SAMPLING_EPS {
        return sampler::greedy(raw);
    }
    let mut l: Vec<f32> = raw.iter().map(|&x| x / r.temperature).collect();
    if r.min_p > 0.0 {
        sampler::apply_min_p(&mut l, r.min_p);
    }
    if r.top_k > 0 {
        sampler::apply_top_k(&mut l, r.top_k as usize);
    }
    if r.top_p < 1.0 {
        sampler::apply_top_p(&mut l, r.top_p);
    }
    sampler::draw(&l, r.uniform as f64).unwrap_or_else(|| sampler::greedy(raw))
}

impl Model for DeviceMock {
    fn spec(&self) -> &ModelSpec {
        self.inner.spec()
    }
    fn allocate_kv_cache(
        &mut self,
        num_blocks: usize,
        block_size: usize,
    ) -> candle_core::Result<()> {
        self.inner.allocate_kv_cache(num_blocks, block_size)
    }
    fn forward(&mut self, batch: &ForwardBatch) -> candle_core::Result<Tensor> {
        self.inner.forward(batch)
    }
    fn sample_on_device(
        &mut self,
        logits: &Tensor,
        rows: &[DeviceSampleRow],
    ) -> Option<candle_core::Result<Vec<u32>>> {
        self.asked.lock().unwrap().extend_from_slice(rows);
        let data = match logits.to_vec2::<f32>() {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(rows
            .iter()
            .map(|r| device_choice(&data[r.row as usize], r))
            .collect()))
    }
}

/// Run `params` on `prompt` to the end; the tokens and logprob count.
fn run(model: Box<dyn Model>, prompt: &[u32], params: SamplingParams) -> (Vec<u32>, usize) {
    let cfg = EngineConfig {
        kv_cache_bytes: Some(64 * mock_block_bytes(16)),
        ..EngineConfig::default()
    };
    let engine = Engine::start(model, Arc::new(ByteDecoder::standard()), cfg).unwrap();
    let mut h = engine
        .add_request(EngineRequest::new(prompt.to_vec(), params))
        .unwrap();
    let (mut tokens, mut logprobs) = (Vec::new(), 0);
    while let Some(ev) = h.events.blocking_recv() {
        match ev {
            RequestEvent::Tokens {
                token_ids,
                logprobs: lp,
                ..
            } => {
                tokens.extend(token_ids);
                logprobs += lp.map_or(0, |l| l.len());
            }
            RequestEvent::Finished { .. } => break,
            RequestEvent::Error { message } => panic!("{message}"),
        }
    }
    (tokens, logprobs)
}

fn device_mock() -> (Box<dyn Model>, Arc<Mutex<Vec<DeviceSampleRow>>>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    (
        Box::new(DeviceMock {
            inner: MockModel::new(512),
            asked: asked.clone(),
        }),
        asked,
    )
}

const PROMPT: [u32; 5] = [3, 1, 4, 1, 5];

#[test]
fn plain_rows_are_sampled_on_the_device_with_the_sequences_draws() {
    // Greedy: the same tokens as the host sampler, every row on the device.
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let (model, asked) = device_mock();
    let (on_device, _) = run(model, &PROMPT, greedy.clone());
    let (on_host, _) = run(Box::new(MockModel::new(512)), &PROMPT, greedy);
    assert_eq!(on_device, on_host);
    let rows = asked.lock().unwrap().clone();
    assert_eq!(rows.len(), 8);
    assert!(rows
        .iter()
        .all(|r| r.temperature == 0.0 && r.uniform == 0.0 && r.row == 0));

    // Seeded sampling: each row's uniform is the draw the host sampler would
    // have taken from the sequence's generator, so the tokens match too.
    let seeded = SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        min_p: 0.01,
        seed: Some(11),
        max_tokens: 8,
        ignore_eos: true,
        ..Default::default()
    };
    let (model, asked) = device_mock();
    let (on_device, _) = run(model, &PROMPT, seeded.clone());
    let (on_host, _) = run(Box::new(MockModel::new(512)), &PROMPT, seeded);
    assert_eq!(on_device, on_host);
    let rows = asked.lock().unwrap().clone();
    let mut rng = sample_rng(Some(11), 0);
    let draws: Vec<f32> = (0..8).map(|_| rng.random::<f64>() as f32).collect();
    assert_eq!(rows.iter().map(|r| r.uniform).collect::<Vec<_>>(), draws);
    assert!(rows
        .iter()
        .all(|r| r.top_k == 20 && r.top_p == 0.9 && r.min_p == 0.01));
}

#[test]
fn rows_needing_the_host_sampler_stay_on_the_host() {
    for params in [
        SamplingParams {
            logprobs: Some(2),
            ..Default::default()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            ..Default::default()
        },
        SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        },
        SamplingParams {
            frequency_penalty: 0.5,
            ..Default::default()
        },
    ] {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 4,
            ignore_eos: true,
            ..params
        };
        let (model, asked) = device_mock();
        let (tokens, logprobs) = run(model, &PROMPT, params.clone());
        let (host, host_logprobs) = run(Box::new(MockModel::new(512)), &PROMPT, params.clone());
        assert_eq!(tokens, host, "{params:?}");
        assert_eq!(logprobs, host_logprobs);
        assert!(
            asked.lock().unwrap().is_empty(),
            "{params:?} went to the device"
        );
    }
    // min_tokens keeps EOS suppressed on the host until it is reached.
    let params = SamplingParams {
        temperature: 0.0,
        min_tokens: 3,
        stop_token_ids: vec![7],
        max_tokens: 5,
        ..Default::default()
    };
    let (model, asked) = device_mock();
    let (tokens, _) = run(model, &PROMPT, params);
    assert!(tokens.len() >= 3);
    assert_eq!(
        asked.lock().unwrap().len(),
        tokens.len() - 3,
        "rows after min_tokens go to the device"
    );
}
