//! Structured outputs: a request's constraint -> a compiled grammar for the
//! engine. The compiler reads the whole vocabulary, so it is built on the
//! first request that needs one, not at load.

use std::sync::{Arc, OnceLock};

use candela_core::{Grammar, GrammarCompiler};
use candela_models::Tokenizer;
use napi::Result;

use crate::guard::invalid;
use crate::params::{grammar_spec, NativeStructuredOutputs};

pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    compiler: OnceLock<std::result::Result<GrammarCompiler, String>>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos_token_ids: Vec<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos_token_ids,
            compiler: OnceLock::new(),
        }
    }

    fn compiler(&self) -> std::result::Result<&GrammarCompiler, String> {
        self.compiler
            .get_or_init(|| {
                let json = self.tokenizer.to_json().map_err(|e| e.to_string())?;
                GrammarCompiler::from_tokenizer_json(&json, self.vocab_size, &self.eos_token_ids)
            })
            .as_ref()
            .map_err(|e| {
                format!("structured outputs are not available for this model's tokenizer: {e}")
            })
    }

    /// Compile a request's constraint; a grammar that cannot be compiled is
    /// the caller's error, named by the field it came in.
    pub fn compile(&self, s: &NativeStructuredOutputs) -> Result<Grammar> {
        let (spec, param) = grammar_spec(s)?;
        let compiler = self
            .compiler()
            .map_err(|e| invalid(format!("{param}: {e}")))?;
        compiler
            .compile(&spec)
            .map_err(|e| invalid(format!("{param}: {e}")))
    }
}
