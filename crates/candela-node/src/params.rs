//! JS sampling parameters -> `candela_core::SamplingParams`, with the model's
//! generation defaults filling what the caller left out.
//!
//! Numbers arrive as JS numbers (f64 / i64 here) so that a bad value gets a
//! message naming the field instead of a generic conversion failure.

use candela_core::params::SamplingParams;
use candela_core::GrammarSpec;
use candela_models::GenerationDefaults;
use napi::Result;
use napi_derive::napi;

use crate::guard::invalid;
use crate::media::NativeInputError;

/// Sampling parameters as JS passes them (all optional, camelCase).
#[napi(object)]
#[derive(Default, Clone)]
pub struct NativeSamplingParams {
    pub n: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub max_tokens: Option<i64>,
    pub min_tokens: Option<i64>,
    pub stop: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    /// Number of top alternatives per token; present (even 0) turns logprobs on.
    pub logprobs: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    /// What the output must match (structured outputs).
    pub structured_outputs: Option<NativeStructuredOutputs>,
}

/// A structured-output constraint: exactly one of its fields (vLLM's
/// `structured_outputs`; OpenAI's `response_format` maps onto `json`).
#[napi(object)]
#[derive(Default, Clone)]
pub struct NativeStructuredOutputs {
    /// A JSON Schema (`{ type: 'object' }` for any JSON object).
    #[napi(ts_type = "Record<string, unknown>")]
    pub json: Option<serde_json::Value>,
    /// A regular expression the whole output matches.
    pub regex: Option<String>,
    /// The output is exactly one of these strings.
    pub choice: Option<Vec<String>>,
    /// A grammar in Lark syntax (llguidance's dialect).
    pub grammar: Option<String>,
    /// How the caller named the field, for error messages (e.g.
    /// `responseFormat.jsonSchema.schema`); default `structuredOutputs.<field>`.
    pub param: Option<String>,
}

/// The grammar spec of a constraint, and the name its errors start with.
pub fn grammar_spec(s: &NativeStructuredOutputs) -> Result<(GrammarSpec, String)> {
    let mut given = Vec::new();
    if let Some(v) = &s.json {
        if !v.is_object() {
            return Err(invalid(format!(
                "{}: a JSON schema must be an object",
                param_of(s, "json")
            )));
        }
        given.push(("json", GrammarSpec::JsonSchema(v.clone())));
    }
    if let Some(v) = &s.regex {
        given.push(("regex", GrammarSpec::Regex(v.clone())));
    }
    if let Some(v) = &s.choice {
        if v.is_empty() {
            return Err(invalid(format!(
                "{}: must list at least one string",
                param_of(s, "choice")
            )));
        }
        given.push(("choice", GrammarSpec::Choice(v.clone())));
    }
    if let Some(v) = &s.grammar {
        given.push(("grammar", GrammarSpec::Lark(v.clone())));
    }
    if given.len() != 1 {
        return Err(invalid(
            "structuredOutputs needs exactly one of json, regex, choice or grammar",
        ));
    }
    let (field, spec) = given.remove(0);
    Ok((spec, param_of(s, field)))
}

fn param_of(s: &NativeStructuredOutputs, field: &str) -> String {
    s.param
        .clone()
        .unwrap_or_else(|| format!("structuredOutputs.{field}"))
}

type Refused<T> = std::result::Result<T, NativeInputError>;

fn count(name: &str, v: i64, min: i64) -> Refused<usize> {
    if v < min {
        return Err(NativeInputError::invalid(format!(
            "{name} must be at least {min}, got {v}"
        )));
    }
    usize::try_from(v).map_err(|_| NativeInputError::invalid(format!("{name} is too large: {v}")))
}

fn float(name: &str, v: f64) -> Refused<f32> {
    if !v.is_finite() {
        return Err(NativeInputError::invalid(format!(
            "{name} must be a finite number, got {v}"
        )));
    }
    Ok(v as f32)
}

/// Build the core's params. `prompt_len` and `max_model_len` give the room
/// after the prompt: a maxTokens above it is refused as vLLM refuses it.
/// Without maxTokens: the model's max_new_tokens, else
/// `fallback_max_tokens`, else the whole room, each capped by the room.
/// A request the context cannot hold is refused as `context_length`.
pub fn to_sampling_params(
    p: &NativeSamplingParams,
    d: &GenerationDefaults,
    prompt_len: usize,
    max_model_len: usize,
    fallback_max_tokens: Option<usize>,
) -> Refused<SamplingParams> {
    let invalid = NativeInputError::invalid;
    let room = max_model_len.saturating_sub(prompt_len);
    let mut s = SamplingParams::default();
    if let Some(n) = p.n {
        s.n = count("n", n, 1)?;
    }
    s.temperature = match p.temperature {
        Some(t) => float("temperature", t)?,
        None => d.temperature.unwrap_or(s.temperature),
    };
    s.top_p = match p.top_p {
        Some(v) => float("topP", v)?,
        None => d.top_p.unwrap_or(s.top_p),
    };
    s.top_k = match p.top_k {
        Some(v) => i32::try_from(v).map_err(|_| invalid(format!("topK is out of range: {v}")))?,
        None => d.top_k.unwrap_or(s.top_k),
    };
    s.min_p = match p.min_p {
        Some(v) => float("minP", v)?,
        None => d.min_p.unwrap_or(s.min_p),
    };
    if let Some(seed) = p.seed {
        if seed < 0 {
            return Err(invalid(format!(
                "seed must be a non-negative integer, got {seed}"
            )));
        }
        s.seed = Some(seed as u64);
    }
    s.repetition_penalty = match p.repetition_penalty {
        Some(v) => float("repetitionPenalty", v)?,
        None => d.repetition_penalty.unwrap_or(s.repetition_penalty),
    };
    if let Some(v) = p.presence_penalty {
        s.presence_penalty = float("presencePenalty", v)?;
    }
    if let Some(v) = p.frequency_penalty {
        s.frequency_penalty = float("frequencyPenalty", v)?;
    }
    if room == 0 {
        return Err(NativeInputError::context_length(
            "the prompt leaves no room for output tokens",
        ));
    }
    s.max_tokens = match p.max_tokens {
        Some(v) => {
            let m = count("maxTokens", v, 1)?;
            if m > room {
                let mut e = NativeInputError::context_length(format!(
                    "'max_tokens' or 'max_completion_tokens' is too large: {m}. This model's maximum context length is \
                     {max_model_len} tokens and your request has {prompt_len} input tokens ({m} > {max_model_len} - {prompt_len})."
                ));
                e.param = Some("maxTokens".into());
                return Err(e);
            }
            m
        }
        None => d
            .max_new_tokens
            .or(fallback_max_tokens)
            .unwrap_or(room)
            .clamp(1, room),
    };
    if let Some(v) = p.min_tokens {
        s.min_tokens = count("minTokens", v, 0)?;
        if s.min_tokens > s.max_tokens {
            if p.max_tokens.is_some_and(|m| (m as usize) < s.min_tokens) {
                return Err(invalid(format!(
                    "minTokens ({}) must not exceed maxTokens ({})",
                    s.min_tokens,
                    p.max_tokens.unwrap_or_default()
                )));
            }
            // Capped by the model's length: cap minTokens with it.
            s.min_tokens = s.max_tokens;
        }
    }
    if let Some(stop) = &p.stop {
        s.stop = stop.clone();
    }
    if let Some(ids) = &p.stop_token_ids {
        s.stop_token_ids = ids.clone();
    }
    if let Some(v) = p.ignore_eos {
        s.ignore_eos = v;
    }
    if let Some(k) = p.logprobs {
        s.logprobs = Some(count("topLogprobs", k, 0)?);
    }
    if let Some(v) = p.skip_special_tokens {
        s.skip_special_tokens = v;
    }
    s.validate().map_err(NativeInputError::invalid)?;
    Ok(s)
}
