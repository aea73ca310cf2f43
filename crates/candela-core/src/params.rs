//! Per-request sampling parameters (vLLM's SamplingParams, camel-free Rust side).

use crate::grammar::Grammar;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Number of independent samples for the prompt (they share its KV blocks).
    pub n: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 (or negative) disables.
    pub top_k: i32,
    /// 0.0 disables.
    pub min_p: f32,
    /// Per-request seed: the same seed gives the same samples.
    pub seed: Option<u64>,
    /// >1 penalises tokens already in prompt or output (CTRL-style, as vLLM/HF).
    pub repetition_penalty: f32,
    /// Subtracted once from logits of tokens that appeared in the output.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output.
    pub frequency_penalty: f32,
    pub max_tokens: usize,
    pub min_tokens: usize,
    /// Stop strings: generation ends when the text contains one; the stop
    /// string itself is not emitted.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (in addition to the model's EOS).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Number of top logprobs to return per generated token (None: no logprobs).
    pub logprobs: Option<usize>,
    pub skip_special_tokens: bool,
    /// The grammar every sample's output must match (structured outputs),
    /// compiled by a [`crate::GrammarCompiler`].
    #[serde(skip)]
    pub grammar: Option<Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Reject values no sampler can honour, with a message naming the field.
    // `!(x > 0.0)` on purpose: NaN must fail too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), String> {
        if self.n == 0 {
            return Err("n must be at least 1".into());
        }
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("topP must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("minP must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0) || !self.repetition_penalty.is_finite() {
            return Err(format!(
                "repetitionPenalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(format!(
                "presencePenalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(format!(
                "frequencyPenalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if self.max_tokens == 0 {
            return Err("maxTokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return Err("minTokens must not exceed maxTokens".into());
        }
        if let Some(k) = self.logprobs {
            if k > 20 {
                return Err(format!("topLogprobs must be at most 20, got {k}"));
            }
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err("stop strings must not be empty".into());
        }
        Ok(())
    }
}
