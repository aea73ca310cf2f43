//! Test doubles: a deterministic mock model whose output depends on the whole
//! context *through its paged KV cache*, and helpers to run requests.
//!
//! Each KV slot stores `(token, h)` where `h = mix(h_prev, token, position)`
//! and `h_prev` is read back from the previous position's slot through the
//! sequence's block table. Next-token logits are a pseudo-random function of
//! the last `h`. So a wrong block table, slot mapping, shared block or
//! recompute changes the tokens. On top of that every forward checks the
//! batch's invariants and the hash chain of each sequence's whole context,
//! and fails (an `Err`, like a real model error) if anything is off.
//!
//! With a sliding `window` the mock reads, as a sliding-window layer does,
//! only the keys a token can see: the chain is checked from the window's
//! first key on (trusting the `h` stored there), so a freed block that is
//! still needed, or one reused by another sequence, fails the forward.

use crate::model::{ForwardBatch, Model, ModelSpec};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

pub const VOCAB: usize = 64;
/// Width of the mock's media embeddings.
pub const MOCK_HIDDEN: usize = 2;

#[derive(Debug, Default, Clone)]
pub struct MockLog {
    /// Tokens per forward.
    pub batch_tokens: Vec<usize>,
    /// Sequences per forward.
    pub batch_seqs: Vec<usize>,
    /// Calls of `encode`.
    pub encodes: usize,
    /// M-RoPE position of each token run, in order (when the batch has them).
    pub mrope: Vec<[u32; 3]>,
}

pub struct MockModel {
    spec: ModelSpec,
    kv: Vec<Option<(u32, u64)>>,
    block_size: usize,
    pub log: Arc<Mutex<MockLog>>,
    /// Forward fails if the batch contains this token.
    pub fail_on_token: Option<u32>,
    /// If set, the most likely next token after a context of length L is
    /// `script[L]` (when L < script.len()).
    pub script: Option<Vec<u32>>,
    /// Sleep this long in every forward (to keep requests alive in tests).
    pub delay: Option<std::time::Duration>,
    /// A token sees itself and the `window - 1` keys before it (at least 2,
    /// so that the previous `h` is always visible).
    pub window: Option<usize>,
}

pub fn mix(prev: u64, token: u32, pos: u32) -> u64 {
    let mut z = prev ^ ((token as u64) << 32 | pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const ROOT: u64 = 0x1234_5678_9ABC_DEF0;

impl MockModel {
    pub fn new(max_model_len: usize) -> Self {
        Self {
            spec: ModelSpec {
                architecture: "MockForCausalLM".into(),
                num_layers: 1,
                num_kv_heads: 1,
                head_dim: 1,
                vocab_size: VOCAB,
                hidden_size: MOCK_HIDDEN,
                max_model_len,
                kv_dtype: DType::F32,
            },
            kv: Vec::new(),
            block_size: 0,
            log: Arc::new(Mutex::new(MockLog::default())),
            fail_on_token: None,
            script: None,
            delay: None,
            window: None,
        }
    }

    fn slot(&self, table: &[u32], pos: usize) -> Result<usize, String> {
        let bs = self.block_size;
        let block = *table
            .get(pos / bs)
            .ok_or_else(|| format!("position {pos} beyond block table {table:?}"))?;
        let slot = block as usize * bs + pos % bs;
        if slot >= self.kv.len() {
            return Err(format!("slot {slot} out of the pool"));
        }
        Ok(slot)
    }

    fn check_and_run(&mut self, b: &ForwardBatch) -> Result<Vec<f32>, String> {
        let bs = self.block_size;
        if b.block_size != bs {
            return Err(format!(
                "batch block_size {} != allocated {bs}",
                b.block_size
            ));
        }
        let n = b.input_ids.len();
        if b.positions.len() != n || b.slot_mapping.len() != n {
            return Err("ragged arrays disagree".into());
        }
        // A media embedding row stands in for its placeholder token: the
        // chain mixes a value derived from the row instead of the token id,
        // so different media (or misplaced rows) change what follows.
        let mut media: Vec<Option<u32>> = vec![None; n];
        for span in &b.mm_embeds {
            let rows = span.embeds.to_vec2::<f32>().map_err(|e| e.to_string())?;
            for (i, r) in rows.iter().enumerate() {
                let slot = media
                    .get_mut(span.start + i)
                    .ok_or("media span beyond the batch")?;
                *slot = Some(0x8000_0000 | (r[0] as u32));
            }
        }
        let mut logits = Vec::new();
        let mut mrope_seen = Vec::new();
        let mut expect_start = 0;
        for s in &b.seqs {
            if s.query_start != expect_start || s.query_len == 0 || s.context_len < s.query_len {
                return Err(format!("bad seq slice {s:?}"));
            }
            expect_start += s.query_len;
            if s.block_table.len() < s.context_len.div_ceil(bs) {
                return Err("block table too short".into());
            }
            let first_new = s.context_len - s.query_len;
            // The visible part of the cached context must hold an intact hash chain.
            let lo = self
                .window
                .map_or(0, |w| (first_new + 1).saturating_sub(w.max(2)));
            let mut h = ROOT;
            for pos in lo..first_new {
                let slot = self.slot(&s.block_table, pos)?;
                let (tok, stored) =
                    self.kv[slot].ok_or_else(|| format!("empty KV slot at position {pos}"))?;
                if pos > lo || lo == 0 {
                    h = mix(h, tok, pos as u32);
                    if h != stored {
                        return Err(format!("KV chain broken at position {pos}"));
                    }
                }
                h = stored;
            }
            for i in 0..s.query_len {
                let idx = s.query_start + i;
                let pos = first_new + i;
                if b.positions[idx] as usize != pos {
                    return Err(format!("position {} != {pos}", b.positions[idx]));
                }
                let slot = self.slot(&s.block_table, pos)?;
                if b.slot_mapping[idx] as usize != slot {
                    return Err(format!(
                        "slot_mapping {} != block table slot {slot}",
                        b.slot_mapping[idx]
                    ));
                }
                let mut tok = media[idx].unwrap_or(b.input_ids[idx]);
                if let Some(m) = &b.mrope_positions {
                    // 3-D positions feed the chain as RoPE feeds attention.
                    let [t, h, w] = *m.get(idx).ok_or("mrope_positions shorter than the batch")?;
                    tok ^= (t << 8) ^ (h << 16) ^ (w << 24);
                    mrope_seen.push([t, h, w]);
                }
                if Some(tok) == self.fail_on_token {
                    return Err(format!("mock failure on token {tok}"));
                }
                h = mix(h, tok, pos as u32);
                self.kv[slot] = Some((tok, h));
            }
            if s.needs_logits {
                let scripted = self
                    .script
                    .as_ref()
                    .and_then(|sc| sc.get(s.context_len).copied());
                for v in 0..VOCAB {
                    let mut l = (mix(h, v as u32, 7) % 1000) as f32 / 100.0 - 5.0;
                    if scripted == Some(v as u32) {
                        l = 50.0;
                    }
                    logits.push(l);
                }
            }
        }
        if expect_start != n {
            return Err("slices do not cover input_ids".into());
        }
        let mut log = self.log.lock().unwrap();
        log.batch_tokens.push(n);
        log.batch_seqs.push(b.seqs.len());
        log.mrope.extend(mrope_seen);
        Ok(logits)
    }
}

impl Model for MockModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        vec![self.window]
    }

    fn allocate_kv_cache(
        &mut self,
        num_blocks: usize,
        block_size: usize,
    ) -> candle_core::Result<()> {
        self.kv = vec![None; num_blocks * block_size];
        self.block_size = block_size;
        Ok(())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> candle_core::Result<Tensor> {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
        let rows = batch.num_logits();
        let logits = self.check_and_run(batch).map_err(candle_core::Error::Msg)?;
        Tensor::from_vec(logits, (rows, VOCAB), &Device::Cpu)
    }

    /// The mock's "encoder" returns its `mock_media` tensor (`[len, MOCK_HIDDEN]`) as is.
    fn encode(&mut self, features: &crate::request::MmFeatures) -> candle_core::Result<Tensor> {
        self.log.lock().unwrap().encodes += 1;
        match features.get("mock_media") {
            Some(t) => Ok(t.clone()),
            None => candle_core::bail!("mock encoder needs a mock_media tensor"),
        }
    }
}

/// KV bytes the mock needs per block (F32, 1 layer, 1 head, dim 1, K and V).
pub fn mock_block_bytes(block_size: usize) -> usize {
    2 * block_size * 4
}
