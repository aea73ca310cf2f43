//! Whisper's special tokens and languages, from `generation_config.json`
//! (`lang_to_id`, `task_to_id`, `no_timestamps_token_id`, `suppress_tokens`,
//! `begin_suppress_tokens`) with the tokenizer as the fallback for ids an
//! older config leaves out.

use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::families::whisper::WhisperConfig;
use crate::tokenizer::Tokenizer;

/// What to do with the speech.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// Text in the spoken language.
    #[default]
    Transcribe,
    /// English text (`<|translate|>`).
    Translate,
}

impl Task {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "transcribe" => Some(Self::Transcribe),
            "translate" => Some(Self::Translate),
            _ => None,
        }
    }
}

/// Whisper's languages: ISO code and the English name OpenAI's API reports
/// (in token order; whisper v1/v2 use the first 99, v3 adds Cantonese).
pub const LANGUAGES: &[(&str, &str)] = &[
    ("en", "english"),
    ("zh", "chinese"),
    ("de", "german"),
    ("es", "spanish"),
    ("ru", "russian"),
    ("ko", "korean"),
    ("fr", "french"),
    ("ja", "japanese"),
    ("pt", "portuguese"),
    ("tr", "turkish"),
    ("pl", "polish"),
    ("ca", "catalan"),
    ("nl", "dutch"),
    ("ar", "arabic"),
    ("sv", "swedish"),
    ("it", "italian"),
    ("id", "indonesian"),
    ("hi", "hindi"),
    ("fi", "finnish"),
    ("vi", "vietnamese"),
    ("he", "hebrew"),
    ("uk", "ukrainian"),
    ("el", "greek"),
    ("ms", "malay"),
    ("cs", "czech"),
    ("ro", "romanian"),
    ("da", "danish"),
    ("hu", "hungarian"),
    ("ta", "tamil"),
    ("no", "norwegian"),
    ("th", "thai"),
    ("ur", "urdu"),
    ("hr", "croatian"),
    ("bg", "bulgarian"),
    ("lt", "lithuanian"),
    ("la", "latin"),
    ("mi", "maori"),
    ("ml", "malayalam"),
    ("cy", "welsh"),
    ("sk", "slovak"),
    ("te", "telugu"),
    ("fa", "persian"),
    ("lv", "latvian"),
    ("bn", "bengali"),
    ("sr", "serbian"),
    ("az", "azerbaijani"),
    ("sl", "slovenian"),
    ("kn", "kannada"),
    ("et", "estonian"),
    ("mk", "macedonian"),
    ("br", "breton"),
    ("eu", "basque"),
    ("is", "icelandic"),
    ("hy", "armenian"),
    ("ne", "nepali"),
    ("mn", "mongolian"),
    ("bs", "bosnian"),
    ("kk", "kazakh"),
    ("sq", "albanian"),
    ("sw", "swahili"),
    ("gl", "galician"),
    ("mr", "marathi"),
    ("pa", "punjabi"),
    ("si", "sinhala"),
    ("km", "khmer"),
    ("sn", "shona"),
    ("yo", "yoruba"),
    ("so", "somali"),
    ("af", "afrikaans"),
    ("oc", "occitan"),
    ("ka", "georgian"),
    ("be", "belarusian"),
    ("tg", "tajik"),
    ("sd", "sindhi"),
    ("gu", "gujarati"),
    ("am", "amharic"),
    ("yi", "yiddish"),
    ("lo", "lao"),
    ("uz", "uzbek"),
    ("fo", "faroese"),
    ("ht", "haitian creole"),
    ("ps", "pashto"),
    ("tk", "turkmen"),
    ("nn", "nynorsk"),
    ("mt", "maltese"),
    ("sa", "sanskrit"),
    ("lb", "luxembourgish"),
    ("my", "myanmar"),
    ("bo", "tibetan"),
    ("tl", "tagalog"),
    ("mg", "malagasy"),
    ("as", "assamese"),
    ("tt", "tatar"),
    ("haw", "hawaiian"),
    ("ln", "lingala"),
    ("ha", "hausa"),
    ("ba", "bashkir"),
    ("jw", "javanese"),
    ("su", "sundanese"),
    ("yue", "cantonese"),
];

/// The English name of a language code (`"en"` -> `"english"`).
pub fn language_name(code: &str) -> Option<&'static str> {
    LANGUAGES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

/// Token ids and suppression lists of one Whisper checkpoint.
#[derive(Debug, Clone)]
pub struct WhisperTokens {
    /// `<|startoftranscript|>`.
    pub sot: u32,
    /// `<|endoftext|>`.
    pub eot: u32,
    pub transcribe: Option<u32>,
    pub translate: Option<u32>,
    /// `<|notimestamps|>`; timestamp tokens follow it.
    pub no_timestamps: Option<u32>,
    /// `<|startofprev|>`, which opens a text prompt.
    pub start_of_prev: Option<u32>,
    /// (code, token id) of every language the model knows; empty for an
    /// English-only model, whose prompt has no language or task token.
    pub languages: Vec<(String, u32)>,
    /// Never sampled.
    pub suppress: Vec<u32>,
    /// Not sampled as the first generated token.
    pub begin_suppress: Vec<u32>,
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    v.and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn id_of(v: Option<&Value>) -> Option<u32> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl WhisperTokens {
    /// From a parsed `generation_config.json` (or `Value::Null` when there is
    /// none), the model config and the tokenizer.
    pub fn new(gen: &Value, cfg: &WhisperConfig, tok: &Tokenizer) -> Result<Self> {
        let by_name = |t: &str| tok.token_to_id(t);
        let sot = id_of(gen.get("decoder_start_token_id"))
            .or_else(|| by_name("<|startoftranscript|>"))
            .unwrap_or(cfg.decoder_start_token_id);
        let eot = id_of(gen.get("eos_token_id"))
            .or(cfg.eos_token_id)
            .or_else(|| by_name("<|endoftext|>"))
            .ok_or_else(|| ModelError::Config("Whisper: no <|endoftext|> token id".into()))?;
        let task_to_id = gen.get("task_to_id");
        let task = |name: &str, token: &str| {
            id_of(task_to_id.and_then(|t| t.get(name))).or_else(|| by_name(token))
        };
        let multilingual = gen.get("is_multilingual").and_then(|m| m.as_bool());
        let mut languages: Vec<(String, u32)> =
            match gen.get("lang_to_id").and_then(|m| m.as_object()) {
                Some(map) => map
                    .iter()
                    .filter_map(|(k, v)| {
                        let code = k.strip_prefix("<|")?.strip_suffix("|>")?;
                        Some((code.to_string(), v.as_u64()? as u32))
                    })
                    .collect(),
                // An older config: the tokenizer's language tokens, unless the
                // config says the model is English-only.
                None if multilingual != Some(false) => LANGUAGES
                    .iter()
                    .filter_map(|(c, _)| Some((c.to_string(), by_name(&format!("<|{c}|>"))?)))
                    .collect(),
                None => Vec::new(),
            };
        if multilingual == Some(false) {
            languages.clear();
        }
        languages.sort_by_key(|(_, id)| *id);
        let mut suppress = ids_of(gen.get("suppress_tokens"));
        suppress.retain(|&t| (t as usize) < cfg.vocab_size);
        let mut begin_suppress = ids_of(gen.get("begin_suppress_tokens"));
        begin_suppress.retain(|&t| (t as usize) < cfg.vocab_size);
        let out = Self {
            sot,
            eot,
            transcribe: task("transcribe", "<|transcribe|>"),
            translate: task("translate", "<|translate|>"),
            no_timestamps: id_of(gen.get("no_timestamps_token_id"))
                .or_else(|| by_name("<|notimestamps|>")),
            start_of_prev: id_of(gen.get("prev_sot_token_id"))
                .or_else(|| by_name("<|startofprev|>")),
            languages,
            suppress,
            begin_suppress,
        };
        for (what, id) in [
            ("<|startoftranscript|>", out.sot),
            ("<|endoftext|>", out.eot),
        ] {
            if id as usize >= cfg.vocab_size {
                return Err(ModelError::Config(format!(
                    "Whisper: {what} id {id} is outside the vocabulary"
                )));
            }
        }
        Ok(out)
    }

    pub fn is_multilingual(&self) -> bool {
        !self.languages.is_empty()
    }

    /// The language token for a code (`"en"`) or English name
    /// (`"english"`), case-insensitive.
    pub fn language_id(&self, language: &str) -> Option<u32> {
        let l = language.trim().to_ascii_lowercase();
        let code = LANGUAGES
            .iter()
            .find(|(_, n)| *n == l)
            .map(|(c, _)| *c)
            .unwrap_or(&l);
        self.languages
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
    }

    /// The code of a language token.
    pub fn language_code(&self, id: u32) -> Option<&str> {
        self.languages
            .iter()
            .find(|(_, t)| *t == id)
            .map(|(c, _)| c.as_str())
    }

    /// Ids from which on tokens are timestamps (never text).
    pub fn timestamp_begin(&self) -> Option<u32> {
        self.no_timestamps.map(|t| t + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WhisperConfig {
        WhisperConfig::from_json(
            &serde_json::json!({"architectures": ["WhisperForConditionalGeneration"]}),
        )
        .unwrap()
    }

    fn tokenizer() -> Tokenizer {
        // Whisper's special tokens over a two-token vocabulary (ids as in whisper-tiny).
        let mut vocab = serde_json::Map::new();
        vocab.insert("a".into(), 0.into());
        vocab.insert("b".into(), 1.into());
        let specials = [
            ("<|endoftext|>", 50257),
            ("<|startoftranscript|>", 50258),
            ("<|en|>", 50259),
            ("<|de|>", 50261),
        ];
        for (t, id) in specials {
            vocab.insert(t.into(), id.into());
        }
        let added: Vec<Value> = specials
            .iter()
            .map(|(t, id)| serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let json = serde_json::json!({"version": "1.0", "added_tokens": added, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "a"}});
        let inner: tokenizers::Tokenizer = serde_json::from_value(json).unwrap();
        Tokenizer::from_parts(inner, None).unwrap()
    }

    #[test]
    fn languages_from_the_generation_config_or_the_tokenizer() {
        let gen = serde_json::json!({
            "decoder_start_token_id": 50258, "eos_token_id": 50257, "no_timestamps_token_id": 50363,
            "lang_to_id": {"<|en|>": 50259, "<|de|>": 50261}, "task_to_id": {"transcribe": 50359, "translate": 50358},
            "suppress_tokens": [1, 99999], "begin_suppress_tokens": [220, 50257]
        });
        let t = WhisperTokens::new(&gen, &cfg(), &tokenizer()).unwrap();
        assert!(t.is_multilingual());
        assert_eq!(t.language_id("en"), Some(50259));
        assert_eq!(t.language_id(" German "), Some(50261));
        assert_eq!(t.language_id("fr"), None);
        assert_eq!(t.language_code(50261), Some("de"));
        assert_eq!(
            (t.transcribe, t.translate, t.timestamp_begin()),
            (Some(50359), Some(50358), Some(50364))
        );
        assert_eq!(
            t.suppress,
            vec![1],
            "ids outside the vocabulary are dropped"
        );

        // No lang_to_id: the tokenizer's language tokens; English-only when the config says so.
        let t = WhisperTokens::new(&Value::Null, &cfg(), &tokenizer()).unwrap();
        assert_eq!(
            t.languages,
            vec![("en".to_string(), 50259), ("de".to_string(), 50261)]
        );
        assert_eq!((t.sot, t.eot), (50258, 50257));
        let t = WhisperTokens::new(
            &serde_json::json!({"is_multilingual": false}),
            &cfg(),
            &tokenizer(),
        )
        .unwrap();
        assert!(!t.is_multilingual());
        assert_eq!(language_name("no"), Some("norwegian"));
        assert_eq!(Task::parse("Translate"), Some(Task::Translate));
        assert_eq!(Task::parse("summarize"), None);
    }
}
