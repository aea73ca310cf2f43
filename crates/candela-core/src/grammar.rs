//! Grammar-constrained sampling (structured outputs) with llguidance.
//!
//! A [`GrammarCompiler`] is built once per tokenizer (the bytes of every
//! token id); it compiles a request's [`GrammarSpec`] into a [`Grammar`]: a
//! matcher that, before each sample, gives the set of tokens that keep the
//! output inside the grammar, and is advanced by every sampled token. Each
//! sequence owns its own matcher (a fork deep-clones its parent's), so the
//! samples of an `n > 1` request follow the grammar independently. The
//! matcher tracks output tokens only: prefix caching and preemption by
//! recompute leave it untouched, since they change where KV lives, never
//! which tokens were sampled.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON Schema (`{"type": "object"}` for OpenAI's `json_object`).
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
}

/// Whitespace a JSON output may put between two tokens: one space, or a
/// line break and an indent of up to 20 spaces / tabs (pretty-printed JSON,
/// as llama.cpp's JSON grammars allow). llguidance allows any run by
/// default, and a small or confused model then writes blank lines until
/// `max_tokens`.
const JSON_WHITESPACE: &str = r"\x20|\r?\n[\x20\x09]{0,20}";

/// Compiles grammars for one vocabulary. Cheap to clone (shared state).
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// From the bytes of every token id (`token_bytes[id]`; special tokens
    /// start with [`TokTrie::SPECIAL_TOKEN_MARKER`]). `vocab_size` is the
    /// model's logits width: ids the tokenizer does not define are never
    /// allowed. `eos_token_ids` are what the grammar allows once it accepts.
    pub fn new(
        mut token_bytes: Vec<Vec<u8>>,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, String> {
        if vocab_size == 0 {
            return Err("the vocabulary is empty".into());
        }
        token_bytes.truncate(vocab_size);
        // Ids without a token (logits padding) become special tokens that no
        // grammar names, so no mask ever allows them.
        for (id, bytes) in token_bytes.iter_mut().enumerate() {
            if bytes.is_empty() {
                *bytes = unused_token(id);
            }
        }
        while token_bytes.len() < vocab_size {
            token_bytes.push(unused_token(token_bytes.len()));
        }
        let mut eos: Vec<u32> = eos_token_ids
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        if eos.is_empty() {
            // A model without EOS: a token past the logits stands for it, so
            // no real token is allowed as "the end"; a complete grammar
            // stops the output by itself.
            eos.push(token_bytes.len() as u32);
            token_bytes.push(unused_token(token_bytes.len()));
        }
        let info = TokRxInfo::new(token_bytes.len() as u32, eos[0]);
        let mut trie = TokTrie::from(&info, &token_bytes);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(&eos);
        }
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
        })
    }

    /// From a Hugging Face `tokenizer.json` (byte-level BPE or byte-fallback
    /// vocabularies).
    pub fn from_tokenizer_json(
        tokenizer: &Value,
        vocab_size: usize,
        eos_token_ids: &[u32],
    ) -> Result<Self, String> {
        // llguidance's reader asserts on malformed byte tokens; keep a panic
        // from a strange vocabulary out of the caller.
        let bytes =
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(tokenizer))
                .map_err(|_| "the tokenizer's vocabulary could not be read".to_string())?
                .map_err(|e| e.to_string())?;
        Self::new(bytes, vocab_size, eos_token_ids)
    }

    /// Compile `spec` into a fresh matcher. The error says what llguidance
    /// could not compile (for a JSON schema, the keyword and where it is).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, String> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_json_options(schema))
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err("choice must list at least one string".into());
                }
                let alts: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        match self.try_compile(grammar) {
            Ok(g) => Ok(g),
            Err(e) => match spec {
                GrammarSpec::JsonSchema(schema) => {
                    match self.locate(schema, schema, String::new(), 0) {
                        Some((at, why)) => {
                            Err(format!("the JSON schema cannot be used at {at}: {why}"))
                        }
                        None => Err(format!("the JSON schema cannot be used: {e}")),
                    }
                }
                _ => Err(e),
            },
        }
    }

    fn try_compile(&self, grammar: TopLevelGrammar) -> Result<Grammar, String> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(Grammar { matcher }),
        }
    }

    /// The deepest subschema (a JSON pointer) that fails to compile on its
    /// own (with the root's definitions in reach), and why; llguidance's
    /// own messages say what, not where.
    fn locate(
        &self,
        root: &Value,
        node: &Value,
        at: String,
        depth: usize,
    ) -> Option<(String, String)> {
        let Value::Object(map) = node else {
            return None;
        };
        let with_defs = |v: &Value| -> Value {
            let mut v = v.clone();
            if let (Value::Object(m), Value::Object(r)) = (&mut v, root) {
                for k in ["$defs", "definitions"] {
                    if let Some(d) = r.get(k) {
                        m.entry(k).or_insert_with(|| d.clone());
                    }
                }
            }
            v
        };
        let why = self
            .try_compile(TopLevelGrammar::from_json_schema(with_json_options(
                &with_defs(node),
            )))
            .err()?;
        if depth < 32 {
            let mut children: Vec<(String, &Value)> = Vec::new();
            for (k, v) in map {
                let key = escape_pointer(k);
                match (k.as_str(), v) {
                    (
                        "properties" | "patternProperties" | "$defs" | "definitions",
                        Value::Object(m),
                    ) => children.extend(
                        m.iter()
                            .map(|(name, s)| (format!("{at}/{key}/{}", escape_pointer(name)), s)),
                    ),
                    ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(a)) => {
                        children.extend(
                            a.iter()
                                .enumerate()
                                .map(|(i, s)| (format!("{at}/{key}/{i}"), s)),
                        )
                    }
                    (
                        "items"
                        | "additionalProperties"
                        | "not"
                        | "if"
                        | "then"
                        | "else"
                        | "contains",
                        Value::Object(_),
                    ) => children.push((format!("{at}/{key}"), v)),
                    _ => {}
                }
            }
            for (path, child) in children {
                if let Some(found) = self.locate(root, child, path, depth + 1) {
                    return Some(found);
                }
            }
        }
        Some((if at.is_empty() { "/".into() } else { at }, why))
    }
}

/// A JSON pointer segment (RFC 6901).
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn unused_token(id: usize) -> Vec<u8> {
    let mut b = format!(".<[unused {id}]>").into_bytes();
    b[0] = TokTrie::SPECIAL_TOKEN_MARKER;
    b
}

/// The schema with candela's JSON layout options, unless it sets its own
/// (llguidance reads them from an `x-guidance` key).
fn with_json_options(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance")
            .or_insert_with(|| json!({ "whitespace_pattern": JSON_WHITESPACE }));
    }
    schema
}

/// One sequence's position in its grammar.
pub struct Grammar {
    matcher: Matcher,
}

impl Clone for Grammar {
    /// An independent copy (its own parser state and lexer caches).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

/// The tokens a grammar allows next: one bit per token id, as 32-bit words
/// (bit `id % 32` of word `id / 32`).
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn words(&self) -> &[u32] {
        self.0.as_slice()
    }
}

impl Grammar {
    /// The tokens allowed next (EOS among them once the grammar accepts).
    pub fn compute_mask(&mut self) -> Result<TokenMask, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        if mask.is_zero() {
            return Err("the grammar allows no token here".into());
        }
        Ok(TokenMask(mask))
    }

    /// Advance past a sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and cannot be extended: the output ends here.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Whether bit `id` is set in `words`.
pub fn mask_allows(words: &[u32], id: usize) -> bool {
    words.get(id / 32).is_some_and(|w| w >> (id % 32) & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per printable ASCII byte, plus "EOS" at the end.
    fn ascii() -> (GrammarCompiler, Vec<Vec<u8>>) {
        let mut words: Vec<Vec<u8>> = (0x20u8..0x7f).map(|b| vec![b]).collect();
        words.push(b"\xFF<eos>".to_vec());
        let eos = words.len() as u32 - 1;
        (
            GrammarCompiler::new(words.clone(), words.len() + 3, &[eos]).unwrap(),
            words,
        )
    }

    fn allowed(mask: &TokenMask, words: &[Vec<u8>]) -> Vec<String> {
        (0..words.len())
            .filter(|&i| mask_allows(mask.words(), i))
            .map(|i| String::from_utf8_lossy(&words[i]).into_owned())
            .collect()
    }

    fn id(words: &[Vec<u8>], s: &str) -> u32 {
        words.iter().position(|w| w == s.as_bytes()).unwrap() as u32
    }

    #[test]
    fn choice_allows_only_the_choices_and_stops_at_the_end() {
        let (c, words) = ascii();
        let mut g = c
            .compile(&GrammarSpec::Choice(vec![
                "yes".into(),
                "no \"way\"".into(),
            ]))
            .unwrap();
        let m = g.compute_mask().unwrap();
        assert_eq!(allowed(&m, &words), vec!["n", "y"]);
        for ch in ["n", "o", " ", "\"", "w", "a", "y", "\""] {
            assert!(!g.is_stopped());
            let m = g.compute_mask().unwrap();
            assert!(mask_allows(m.words(), id(&words, ch) as usize), "{ch}");
            g.consume(id(&words, ch)).unwrap();
        }
        assert!(g.is_stopped());
    }

    #[test]
    fn padding_ids_are_never_allowed_and_forks_are_independent() {
        let (c, words) = ascii();
        let mut g = c.compile(&GrammarSpec::Regex("[ab]+".into())).unwrap();
        let m = g.compute_mask().unwrap();
        for pad in words.len()..words.len() + 3 {
            assert!(!mask_allows(m.words(), pad));
        }
        g.consume(id(&words, "a")).unwrap();
        let mut fork = g.clone();
        fork.consume(id(&words, "b")).unwrap();
        // Accepting now: EOS is allowed in both.
        let eos = words.len() - 1;
        assert!(mask_allows(g.compute_mask().unwrap().words(), eos));
        assert!(mask_allows(fork.compute_mask().unwrap().words(), eos));
        assert!(g.consume(id(&words, "c")).is_err());
    }

    #[test]
    fn bad_grammars_are_errors_that_say_why() {
        let (c, _) = ascii();
        let e = c
            .compile(&GrammarSpec::Lark("start: foo".into()))
            .unwrap_err();
        assert!(e.contains("foo"), "{e}");
        let e = c
            .compile(&GrammarSpec::JsonSchema(
                json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
            ))
            .unwrap_err();
        assert!(
            e.starts_with("the JSON schema cannot be used at /properties/a: ")
                && e.contains("missing"),
            "{e}"
        );
        let deep = json!({"type": "object", "$defs": {"p": {"type": "string"}}, "properties": {"ok": {"$ref": "#/$defs/p"},
            "list": {"type": "array", "items": {"type": "object", "properties": {"x/y": {"type": "strange"}}}}}});
        let e = c.compile(&GrammarSpec::JsonSchema(deep)).unwrap_err();
        assert!(
            e.starts_with(
                "the JSON schema cannot be used at /properties/list/items/properties/x~1y: "
            ),
            "{e}"
        );
        let e = c
            .compile(&GrammarSpec::JsonSchema(json!({"type": "strange"})))
            .unwrap_err();
        assert!(
            e.starts_with("the JSON schema cannot be used at /: "),
            "{e}"
        );
        assert!(c.compile(&GrammarSpec::Choice(vec![])).is_err());
        assert!(c.compile(&GrammarSpec::Regex("(".into())).is_err());
    }
}
