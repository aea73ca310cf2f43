//! What flows back from the engine to a request's caller.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token id or a stop string.
    Stop,
    /// max_tokens or the model's max length.
    Length,
    /// Aborted by the caller.
    Abort,
    /// The engine failed while running this request.
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely alternatives, best first (len = requested top_logprobs).
    pub top: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// One event for one sample (`index` < n) of a request.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestEvent {
    /// New tokens for sample `index`, with the text they complete. `text` may be
    /// empty while a multi-byte character or a possible stop string is pending.
    /// A sample's last `Tokens` event carries any held-back text, flushed; its
    /// `token_ids` include a final EOS / stop token, whose text is not emitted.
    Tokens {
        index: usize,
        token_ids: Vec<u32>,
        text: String,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// Sample `index` ended (its final text came in the `Tokens` event before).
    Finished {
        index: usize,
        reason: FinishReason,
        /// The stop string or stop token that ended it, if any.
        stop_reason: Option<String>,
        usage: Usage,
    },
    /// The request failed as a whole (bad input found late, model error).
    /// Nothing follows it; unfinished samples get no `Finished` event.
    Error { message: String },
}
