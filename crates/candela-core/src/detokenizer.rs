//! Incremental detokenization of one sample, with stop strings.
//!
//! Decoding token by token is wrong for byte-level BPE and sentencepiece: a
//! character may span several tokens and a token's leading space depends on
//! its left neighbour. So each step decodes a small window twice, once up to
//! the last emitted token (`prefix_offset..read_offset`) and once including
//! the new ones (`prefix_offset..`), and emits the difference, but only once
//! it no longer ends in U+FFFD (an incomplete UTF-8 sequence). The window
//! starts with the last few prompt tokens so the first output token gets its
//! spacing right.
//!
//! Stop strings: generation ends as soon as the text contains one; it and
//! whatever follows it are never emitted. Text that could be the start of a
//! stop string (a suffix equal to a stop string's proper prefix) is held back
//! until it is resolved, and flushed at finish.

use crate::model::TokenDecoder;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Prompt tokens kept as left context for the first output token.
const PROMPT_CONTEXT_TOKENS: usize = 5;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetokOutput {
    /// Text that became safe to emit.
    pub text: String,
    /// The stop string that ended generation, if one matched.
    pub stop: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
    /// Output text decoded so far (complete characters only until finish).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
}

impl Detokenizer {
    pub fn new(prompt: &[u32], stop: Vec<String>, skip_special_tokens: bool) -> Self {
        let start = prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS);
        let ids = prompt[start..].to_vec();
        let read_offset = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
            text: String::new(),
            emitted: 0,
            stop,
        }
    }

    /// Text handed out so far.
    pub fn emitted_text(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Add one generated token. `check_stop` is false while stop strings must
    /// not end generation yet (before `min_tokens`).
    pub fn push(
        &mut self,
        decoder: &dyn TokenDecoder,
        token: u32,
        check_stop: bool,
    ) -> Result<DetokOutput, String> {
        self.ids.push(token);
        let prefix = self.decode(decoder, self.prefix_offset, self.read_offset)?;
        let full = self.decode(decoder, self.prefix_offset, self.ids.len())?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            self.text.push_str(new_part(&prefix, &full));
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.scan(check_stop, false))
    }

    /// The sample ended for another reason than a stop string: decode any
    /// pending bytes (even an incomplete character) and release held text.
    pub fn finish(
        &mut self,
        decoder: &dyn TokenDecoder,
        check_stop: bool,
    ) -> Result<DetokOutput, String> {
        if self.read_offset < self.ids.len() {
            let prefix = self.decode(decoder, self.prefix_offset, self.read_offset)?;
            let full = self.decode(decoder, self.prefix_offset, self.ids.len())?;
            self.text.push_str(new_part(&prefix, &full));
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(self.scan(check_stop, true))
    }

    fn scan(&mut self, check_stop: bool, flush: bool) -> DetokOutput {
        if check_stop {
            let region = &self.text[self.emitted..];
            let first = self
                .stop
                .iter()
                .filter_map(|s| region.find(s.as_str()).map(|pos| (pos, s)))
                .min_by_key(|(pos, _)| *pos);
            if let Some((pos, s)) = first {
                let end = self.emitted + pos;
                let text = self.text[self.emitted..end].to_string();
                let stop = Some(s.clone());
                self.text.truncate(end);
                self.emitted = end;
                return DetokOutput { text, stop };
            }
        }
        let hold = if flush { 0 } else { self.held_suffix_len() };
        let end = (self.text.len() - hold).max(self.emitted);
        let text = self.text[self.emitted..end].to_string();
        self.emitted = end;
        DetokOutput { text, stop: None }
    }

    /// Longest suffix of the unemitted text that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let region = &self.text[self.emitted..];
        let mut hold = 0;
        for s in &self.stop {
            for k in (hold + 1..s.len()).rev() {
                if s.is_char_boundary(k) && region.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }

    fn decode(&self, decoder: &dyn TokenDecoder, from: usize, to: usize) -> Result<String, String> {
        let ids = &self.ids[from.min(to)..to];
        if ids.is_empty() {
            return Ok(String::new());
        }
        let skip = self.skip_special_tokens;
        match catch_unwind(AssertUnwindSafe(|| decoder.decode(ids, skip))) {
            Ok(r) => r.map_err(|e| format!("detokenization failed: {e}")),
            Err(_) => Err("detokenization failed: the tokenizer panicked".into()),
        }
    }
}

/// What `full` adds after `prefix`; if the decoder re-rendered the prefix
/// differently, everything after the common prefix.
fn new_part<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    full.get(common..).unwrap_or("")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Byte-level mock: each id is a byte string; decoding concatenates and
    /// replaces invalid UTF-8 with U+FFFD, like a byte-level BPE tokenizer.
    /// Ids >= 200 are "special" and dropped when skipping.
    pub struct ByteDecoder(pub Vec<Vec<u8>>);

    impl ByteDecoder {
        pub fn standard() -> Self {
            let mut v: Vec<Vec<u8>> = (0..26u8).map(|i| vec![b'a' + i]).collect(); // 0..26: a..z
            v.push(b" ".to_vec()); // 26
            v.push(vec![0xE2]); // 27: first byte of € (E2 82 AC)
            v.push(vec![0x82]); // 28
            v.push(vec![0xAC]); // 29
            v.push("é".as_bytes().to_vec()); // 30
            v.push(b"ab".to_vec()); // 31
            v.push(vec![0xF0, 0x9F]); // 32: first half of 😀 (F0 9F 98 80)
            v.push(vec![0x98, 0x80]); // 33: second half
            ByteDecoder(v)
        }
    }

    impl TokenDecoder for ByteDecoder {
        fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
            let mut bytes = Vec::new();
            for &id in ids {
                if id >= 200 {
                    if !skip_special_tokens {
                        bytes.extend_from_slice(format!("<s{id}>").as_bytes());
                    }
                    continue;
                }
                match self.0.get(id as usize) {
                    Some(b) => bytes.extend_from_slice(b),
                    None => bytes.push(b'?'),
                }
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn run(tokens: &[u32], stop: &[&str]) -> (Vec<String>, String, Option<String>) {
        let dec = ByteDecoder::standard();
        let mut d = Detokenizer::new(&[0, 1], stop.iter().map(|s| s.to_string()).collect(), true);
        let mut pieces = Vec::new();
        for &t in tokens {
            let out = d.push(&dec, t, true).unwrap();
            pieces.push(out.text.clone());
            if out.stop.is_some() {
                let all: String = pieces.concat();
                return (pieces, all, out.stop);
            }
        }
        let out = d.finish(&dec, true).unwrap();
        pieces.push(out.text);
        let all: String = pieces.concat();
        (pieces, all, out.stop)
    }

    #[test]
    fn multibyte_chars_are_never_split() {
        // "a€b😀"
        let (pieces, all, stop) = run(&[0, 27, 28, 29, 1, 32, 33], &[]);
        assert_eq!(all, "a€b😀");
        assert_eq!(stop, None);
        assert_eq!(
            pieces[..7],
            ["a", "", "", "€", "b", "", "😀"].map(String::from)
        );
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'));
        }
    }

    #[test]
    fn stop_string_is_cut_and_never_emitted() {
        // "hello world" with stop "lo w": emitted "hel".
        let hello: Vec<u32> = "hello world"
            .bytes()
            .map(|b| if b == b' ' { 26 } else { (b - b'a') as u32 })
            .collect();
        let (pieces, all, stop) = run(&hello, &["lo w"]);
        assert_eq!(all, "hel");
        assert_eq!(stop.as_deref(), Some("lo w"));
        // "l" after "hel" was held (prefix of the stop string), never emitted.
        assert!(pieces.iter().all(|p| !p.contains("lo")));
    }

    #[test]
    fn held_text_is_flushed_when_the_stop_does_not_complete() {
        // "hel" then finish: "l" could start "lo w" -> held, flushed at finish.
        let dec = ByteDecoder::standard();
        let mut d = Detokenizer::new(&[0], vec!["lo w".into()], true);
        assert_eq!(d.push(&dec, 7, true).unwrap().text, "h");
        assert_eq!(d.push(&dec, 4, true).unwrap().text, "e");
        // "l" could start "lo w": held.
        assert_eq!(d.push(&dec, 11, true).unwrap().text, "");
        // "ll": the first l can no longer start it; the second is held.
        assert_eq!(d.push(&dec, 11, true).unwrap().text, "l");
        assert_eq!(d.push(&dec, 23, true).unwrap().text, "lx");
        assert_eq!(d.push(&dec, 11, true).unwrap().text, "");
        let fin = d.finish(&dec, true).unwrap();
        assert_eq!(
            fin,
            DetokOutput {
                text: "l".into(),
                stop: None
            }
        );
        assert_eq!(d.emitted_text(), "hellxl");
    }

    #[test]
    fn multibyte_stop_string_split_across_tokens() {
        // Text "a€b", stop "€": cut before the euro although its bytes arrive in 3 tokens.
        let (pieces, all, stop) = run(&[0, 27, 28, 29, 1], &["€"]);
        assert_eq!(all, "a");
        assert_eq!(stop.as_deref(), Some("€"));
        assert!(pieces
            .iter()
            .all(|p| !p.contains('\u{FFFD}') && !p.contains('€')));
        // Stop string that starts with a multibyte char followed by ascii.
        let (_, all2, stop2) = run(&[0, 30, 30, 1, 2], &["éb"]);
        assert_eq!(all2, "aé");
        assert_eq!(stop2.as_deref(), Some("éb"));
    }

    #[test]
    fn earliest_stop_wins_and_stop_inside_one_token() {
        // Token 31 = "ab": "xab" with stops ["b", "ab"] -> cut at "ab" (earlier).
        let (_, all, stop) = run(&[23, 31, 2], &["b", "ab"]);
        assert_eq!(all, "x");
        assert_eq!(stop.as_deref(), Some("ab"));
    }

    #[test]
    fn stops_ignored_when_not_checked_and_finish_flushes_partial_bytes() {
        let dec = ByteDecoder::standard();
        let mut d = Detokenizer::new(&[0], vec!["b".into()], true);
        let o = d.push(&dec, 1, false).unwrap();
        assert_eq!(
            o,
            DetokOutput {
                text: "b".into(),
                stop: None
            }
        );
        let o = d.push(&dec, 27, true).unwrap();
        assert_eq!(o.text, "");
        // Ends mid-character: flushed as U+FFFD, the same as decoding everything.
        let fin = d.finish(&dec, true).unwrap();
        assert_eq!(fin.text, "\u{FFFD}");
        assert_eq!(d.emitted_text(), dec.decode(&[1, 27], true).unwrap());
    }

    #[test]
    fn special_tokens_are_skipped() {
        let (_, all, _) = run(&[0, 250, 1], &[]);
        assert_eq!(all, "ab");
    }
}
