//! Turning one row of logits into one token.
//!
//! Order of operations (as vLLM v1): the grammar's mask (structured
//! outputs), min-tokens suppression, repetition /
//! presence / frequency penalties, then either greedy argmax (temperature 0)
//! or temperature scaling -> min_p -> top_k -> top_p -> a draw from the
//! sequence's own RNG.
//!
//! Logprobs are "raw": `log_softmax` of the model's logits before any penalty,
//! temperature or truncation (vLLM's default `logprobs_mode = raw_logprobs`).

use crate::grammar::mask_allows;
use crate::output::{TokenLogprob, TopLogprob};
use crate::params::SamplingParams;
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use std::collections::{HashMap, HashSet};

/// Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

/// Per-sample random generator. Xoshiro256++ is a named, portable algorithm:
/// the same seed gives the same stream on every platform and rand release.
pub type SampleRng = Xoshiro256PlusPlus;

/// The RNG of sample `sample_index` of a request: derived from the request's
/// seed when it has one (so the same seed reproduces every sample), otherwise
/// from the OS.
pub fn sample_rng(seed: Option<u64>, sample_index: usize) -> SampleRng {
    match seed {
        Some(seed) => {
            let mut h = blake3::Hasher::new();
            h.update(b"candela-sampler-v1");
            h.update(&seed.to_le_bytes());
            h.update(&(sample_index as u64).to_le_bytes());
            SampleRng::from_seed(*h.finalize().as_bytes())
        }
        None => rand::make_rng(),
    }
}

/// What the sampler needs to know about the sequence besides its logits.
#[derive(Debug, Clone, Copy)]
pub struct SamplingInput<'a> {
    pub params: &'a SamplingParams,
    pub prompt_tokens: &'a [u32],
    pub output_tokens: &'a [u32],
    /// Token ids that must not be chosen now (EOS and stop tokens before
    /// `min_tokens` outputs).
    pub suppressed: &'a [u32],
    /// The grammar's allowed tokens, one bit per id (structured outputs):
    /// the sample is always one of them.
    pub allowed: Option<&'a [u32]>,
}

#[derive(Debug, Clone)]
pub struct Sampled {
    pub token_id: u32,
    /// Present when `params.logprobs` is set.
    pub logprob: Option<TokenLogprob>,
}

/// Choose the next token from `raw` (one f32 logits row over the vocabulary).
pub fn sample(raw: &[f32], input: &SamplingInput<'_>, rng: &mut SampleRng) -> Sampled {
    let p = input.params;
    let mut logits: Vec<f32> = raw
        .iter()
        .map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x })
        .collect();
    if let Some(words) = input.allowed {
        apply_allowed(&mut logits, words);
    }
    // Where the grammar leaves only tokens min_tokens holds back (it is
    // complete and only EOS remains), the grammar wins.
    if input.allowed.is_none() || !only_suppressed_left(&logits, input.suppressed) {
        suppress(&mut logits, input.suppressed);
    }
    if p.repetition_penalty != 1.0 {
        apply_repetition_penalty(
            &mut logits,
            input.prompt_tokens.iter().chain(input.output_tokens),
            p.repetition_penalty,
        );
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        apply_presence_frequency_penalties(
            &mut logits,
            input.output_tokens,
            p.presence_penalty,
            p.frequency_penalty,
        );
    }
    // With every logit -inf (a grammar's tokens the model rules out), the
    // grammar's first token, else the raw argmax.
    let fallback = || match input.allowed {
        Some(words) => (0..raw.len())
            .find(|&i| mask_allows(words, i))
            .map_or(0, |i| i as u32),
        None => greedy(raw),
    };
    let token_id = if p.temperature < SAMPLING_EPS {
        if logits.iter().any(|l| l.is_finite()) {
            greedy(&logits)
        } else {
            fallback()
        }
    } else {
        let t = p.temperature;
        for l in logits.iter_mut() {
            *l /= t;
        }
        if p.min_p > 0.0 {
            apply_min_p(&mut logits, p.min_p);
        }
        if p.top_k > 0 {
            apply_top_k(&mut logits, p.top_k as usize);
        }
        if p.top_p < 1.0 {
            apply_top_p(&mut logits, p.top_p);
        }
        let u: f64 = rng.random();
        draw(&logits, u).unwrap_or_else(fallback)
    };
    let logprob = p.logprobs.map(|k| {
        let lp = log_softmax(raw);
        TokenLogprob {
            token_id,
            logprob: lp
                .get(token_id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
            top: top_logprobs(&lp, k),
        }
    });
    Sampled { token_id, logprob }
}

/// Set the logits of tokens the mask does not allow to -inf.
pub fn apply_allowed(logits: &mut [f32], words: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, l) in chunk.iter_mut().enumerate() {
            if bits >> b & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Whether every finite logit belongs to one of `ids`.
fn only_suppressed_left(logits: &[f32], ids: &[u32]) -> bool {
    logits
        .iter()
        .enumerate()
        .all(|(i, l)| !l.is_finite() || ids.contains(&(i as u32)))
}

/// Set the logits of `ids` to -inf.
pub fn suppress(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// HF / vLLM repetition penalty over every distinct token in `tokens`:
/// positive logits are divided by `penalty`, negative ones multiplied.
pub fn apply_repetition_penalty<'a>(
    logits: &mut [f32],
    tokens: impl Iterator<Item = &'a u32>,
    penalty: f32,
) {
    let seen: HashSet<u32> = tokens.copied().collect();
    for id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            if *l > 0.0 {
                *l /= penalty;
            } else {
                *l *= penalty;
            }
        }
    }
}

/// OpenAI presence / frequency penalties over the output tokens:
/// `logit -= frequency * count + presence * (count > 0)`.
pub fn apply_presence_frequency_penalties(
    logits: &mut [f32],
    output: &[u32],
    presence: f32,
    frequency: f32,
) {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for &t in output {
        *counts.entry(t).or_insert(0) += 1;
    }
    for (id, c) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= frequency * c as f32 + presence;
        }
    }
}

/// Keep tokens whose probability is at least `min_p` times the top one's:
/// `p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p)`.
pub fn apply_min_p(logits: &mut [f32], min_p: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || min_p <= 0.0 {
        return;
    }
    let threshold = max + min_p.ln();
    for l in logits.iter_mut() {
        if *l < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Keep the `k` largest logits (tokens tied with the k-th are kept too).
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    let finite = logits.iter().filter(|l| l.is_finite()).count();
    if k == 0 || k >= finite {
        return;
    }
    let mut vals: Vec<f32> = logits.iter().copied().filter(|l| l.is_finite()).collect();
    let (_, kth, _) = vals.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for l in logits.iter_mut() {
        if *l < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Nucleus: keep the most likely tokens, best first, until their probability
/// mass reaches `top_p` (always at least one token).
///
/// Sorting a 150k vocabulary every step is slow and the nucleus is usually a
/// handful of tokens, so the best `k` candidates are selected and sorted for a
/// growing `k` until their mass reaches `top_p`.
pub fn apply_top_p(logits: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let mut idx: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if idx.len() <= 1 {
        return;
    }
    let by_rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let max = idx
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let total: f64 = idx.iter().map(|&i| (logits[i] as f64 - max).exp()).sum();
    let target = top_p as f64 * total;
    let mut k = 64.min(idx.len());
    let keep = loop {
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_rank);
        }
        idx[..k].sort_unstable_by(by_rank);
        let mut cum = 0.0f64;
        let mut found = None;
        for (rank, &i) in idx[..k].iter().enumerate() {
            if rank > 0 && cum >= target {
                found = Some(rank);
                break;
            }
            cum += (logits[i] as f64 - max).exp();
        }
        match found {
            Some(rank) => break rank,
            None if k == idx.len() => break k,
            None => k = (k * 4).min(idx.len()),
        }
    };
    for &i in &idx[keep..] {
        logits[i] = f32::NEG_INFINITY;
    }
}

/// Index of the largest logit; ties go to the lowest id; NaN is ignored.
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if l <= b => {}
            _ => best = Some((i, l)),
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Sample from `softmax(logits)` with the uniform draw `u` in [0, 1), walking
/// ids in order. None when no logit is finite.
pub fn draw(logits: &[f32], u: f64) -> Option<u32> {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let max = max as f64;
    let total: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l as f64 - max).exp())
        .sum();
    let target = u * total;
    let mut cum = 0.0f64;
    let mut last = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_finite() {
            continue;
        }
        cum += (l as f64 - max).exp();
        last = Some(i as u32);
        if cum > target {
            return last;
        }
    }
    last
}

/// `log_softmax` in f64, back to f32; NaN counts as -inf.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits
        .iter()
        .copied()
        .filter(|l| !l.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let max = max as f64;
    let sum: f64 = logits
        .iter()
        .filter(|l| !l.is_nan())
        .map(|&l| (l as f64 - max).exp())
        .sum();
    let lse = max + sum.ln();
    logits
        .iter()
        .map(|&l| {
            if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                (l as f64 - lse) as f32
            }
        })
        .collect()
}

/// The `k` best entries of a logprob row, best first, ties by lowest id.
pub fn top_logprobs(logprobs: &[f32], k: usize) -> Vec<TopLogprob> {
    let k = k.min(logprobs.len());
    if k == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logprobs.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter()
        .map(|i| TopLogprob {
            token_id: i as u32,
            logprob: logprobs[i],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    fn input<'a>(p: &'a SamplingParams, prompt: &'a [u32], output: &'a [u32]) -> SamplingInput<'a> {
        SamplingInput {
            params: p,
            prompt_tokens: prompt,
            output_tokens: output,
            suppressed: &[],
            allowed: None,
        }
    }

    #[test]
    fn top_k_keeps_k_largest_and_ties() {
        let mut l = vec![1.0, 3.0, 2.0, 0.0];
        apply_top_k(&mut l, 2);
        assert_eq!(l, vec![NEG, 3.0, 2.0, NEG]);
        let mut tie = vec![1.0, 2.0, 2.0, 0.0];
        apply_top_k(&mut tie, 1);
        assert_eq!(tie, vec![NEG, 2.0, 2.0, NEG]);
        let mut all = vec![1.0, 2.0];
        apply_top_k(&mut all, 5);
        assert_eq!(all, vec![1.0, 2.0]);
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // probs ~ [0.643, 0.236, 0.087, 0.032]
        let base: Vec<f32> = vec![3.0, 2.0, 1.0, 0.0];
        let mut a = base.clone();
        apply_top_p(&mut a, 0.5);
        assert_eq!(a, vec![3.0, NEG, NEG, NEG]);
        let mut b = base.clone();
        apply_top_p(&mut b, 0.7);
        assert_eq!(b, vec![3.0, 2.0, NEG, NEG]);
        let mut c = base.clone();
        apply_top_p(&mut c, 0.95);
        assert_eq!(c, vec![3.0, 2.0, 1.0, NEG]);
        // Order in the vocabulary does not matter.
        let mut d = vec![0.0, 2.0, 3.0, 1.0];
        apply_top_p(&mut d, 0.7);
        assert_eq!(d, vec![NEG, 2.0, 3.0, NEG]);
    }

    #[test]
    fn top_p_on_a_large_vocab_matches_a_full_sort() {
        let row: Vec<f32> = (0..5000u32)
            .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 1000) as f32 / 120.0)
            .collect();
        for p in [0.01f32, 0.3, 0.9, 0.999] {
            let mut fast = row.clone();
            apply_top_p(&mut fast, p);
            // Reference: full sort.
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let max = row[idx[0]] as f64;
            let total: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            let mut cum = 0.0;
            let mut kept = 0;
            for &i in &idx {
                if kept > 0 && cum >= p as f64 * total {
                    break;
                }
                cum += (row[i] as f64 - max).exp();
                kept += 1;
            }
            let kept_fast = fast.iter().filter(|l| l.is_finite()).count();
            assert_eq!(kept_fast, kept, "top_p {p}");
            assert!(idx[..kept].iter().all(|&i| fast[i].is_finite()));
            assert!(kept > 1 || p < 0.05);
        }
    }

    #[test]
    fn min_p_masks_relative_to_top() {
        // p_i / p_max = exp(l_i - l_max): [1, e^-1=.37, e^-2=.135, e^-3=.05]
        let mut l = vec![3.0, 2.0, 1.0, 0.0];
        apply_min_p(&mut l, 0.1);
        assert_eq!(l, vec![3.0, 2.0, 1.0, NEG]);
        let mut l2 = vec![3.0, 2.0, 1.0, 0.0];
        apply_min_p(&mut l2, 0.5);
        assert_eq!(l2, vec![3.0, NEG, NEG, NEG]);
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 4.0, 1.0];
        // token 0 twice: penalised once.
        apply_repetition_penalty(&mut l, [0u32, 1, 0, 99].iter(), 2.0);
        assert_eq!(l, vec![1.0, -4.0, 4.0, 1.0]);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut l = vec![1.0, 1.0, 1.0];
        apply_presence_frequency_penalties(&mut l, &[0, 0, 0, 2], 0.5, 0.25);
        assert_eq!(l, vec![1.0 - 0.75 - 0.5, 1.0, 1.0 - 0.25 - 0.5]);
    }

    #[test]
    fn penalties_apply_over_prompt_and_output_in_sample() {
        let mut p = params();
        p.temperature = 0.0;
        p.repetition_penalty = 4.0;
        // token 1 is best raw, but it's in the prompt: 4.0/4 = 1.0 < 3.0.
        let row = vec![0.0, 4.0, 3.0];
        assert_eq!(
            sample(&row, &input(&p, &[1], &[]), &mut sample_rng(Some(0), 0)).token_id,
            2
        );
        // Presence penalty only looks at the output.
        let mut q = params();
        q.temperature = 0.0;
        q.presence_penalty = 2.0;
        assert_eq!(
            sample(&row, &input(&q, &[1], &[]), &mut sample_rng(Some(0), 0)).token_id,
            1
        );
        assert_eq!(
            sample(&row, &input(&q, &[], &[1]), &mut sample_rng(Some(0), 0)).token_id,
            2
        );
    }

    #[test]
    fn greedy_ties_go_to_lowest_id_and_nan_is_ignored() {
        assert_eq!(greedy(&[1.0, 5.0, 5.0, 2.0]), 1);
        assert_eq!(greedy(&[f32::NAN, 0.5, f32::NAN]), 1);
        assert_eq!(greedy(&[NEG, NEG]), 0);
        let mut p = params();
        p.temperature = 0.0;
        let s = sample(
            &[0.0, 7.0, 7.0],
            &input(&p, &[], &[]),
            &mut sample_rng(None, 0),
        );
        assert_eq!(s.token_id, 1);
    }

    #[test]
    fn suppressed_tokens_are_never_chosen() {
        let mut p = params();
        p.temperature = 0.0;
        let inp = SamplingInput {
            params: &p,
            prompt_tokens: &[],
            output_tokens: &[],
            suppressed: &[2],
            allowed: None,
        };
        assert_eq!(
            sample(&[0.0, 1.0, 9.0], &inp, &mut sample_rng(Some(1), 0)).token_id,
            1
        );
    }

    #[test]
    fn a_grammar_mask_holds_for_greedy_and_random_draws_and_beats_min_tokens() {
        // 40 tokens; the mask allows ids 3 and 35 (second word) only.
        let row: Vec<f32> = (0..40).map(|i| i as f32 * 0.1).collect();
        let words = [1u32 << 3, 1u32 << 3];
        let mut p = params();
        p.temperature = 0.0;
        fn inp<'a>(
            p: &'a SamplingParams,
            suppressed: &'a [u32],
            words: &'a [u32],
        ) -> SamplingInput<'a> {
            SamplingInput {
                params: p,
                prompt_tokens: &[],
                output_tokens: &[],
                suppressed,
                allowed: Some(words),
            }
        }
        assert_eq!(
            sample(&row, &inp(&p, &[], &words), &mut sample_rng(Some(0), 0)).token_id,
            35
        );
        // min_tokens holds 35 back: 3 is still allowed, so it is chosen.
        assert_eq!(
            sample(&row, &inp(&p, &[35], &words), &mut sample_rng(Some(0), 0)).token_id,
            3
        );
        // Both held back: the grammar wins over min_tokens.
        assert!([3, 35].contains(
            &sample(
                &row,
                &inp(&p, &[3, 35], &words),
                &mut sample_rng(Some(0), 0)
            )
            .token_id
        ));
        let mut q = params();
        q.temperature = 5.0;
        let mut rng = sample_rng(Some(3), 0);
        let mut seen = HashSet::new();
        for _ in 0..300 {
            seen.insert(sample(&row, &inp(&q, &[], &words), &mut rng).token_id);
        }
        assert_eq!(seen, HashSet::from([3, 35]));
        // Every allowed logit -inf: still an allowed token.
        let dead = vec![NEG; 40];
        assert_eq!(sample(&dead, &inp(&q, &[], &words), &mut rng).token_id, 3);
    }

    #[test]
    fn seeded_sampling_reproduces_and_differs_by_seed_and_index() {
        let mut p = params();
        p.temperature = 1.0;
        let row: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed: u64, idx: usize| {
            let mut rng = sample_rng(Some(seed), idx);
            (0..40)
                .map(|_| sample(&row, &input(&p, &[], &[]), &mut rng).token_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42, 0), run(42, 0));
        assert_ne!(run(42, 0), run(43, 0));
        assert_ne!(run(42, 0), run(42, 1));
    }

    #[test]
    fn sampling_respects_masks_and_follows_distribution() {
        let mut p = params();
        p.top_k = 2;
        let row = vec![0.0, 2.0f32.ln(), 0.0, 1.0f32.ln() + 0.0];
        // After top_k=2: tokens 1 (w=2) and the tie group at 0.0 (ids 0, 2, 3: w=1).
        let mut rng = sample_rng(Some(7), 0);
        let mut counts = [0usize; 4];
        for _ in 0..5000 {
            counts[sample(&row, &input(&p, &[], &[]), &mut rng).token_id as usize] += 1;
        }
        // Token 1 has prob 2/5; each of the others 1/5.
        let f1 = counts[1] as f64 / 5000.0;
        assert!((f1 - 0.4).abs() < 0.03, "freq of token 1 = {f1}");
        let mut q = params();
        q.top_p = 0.3;
        let mut rng = sample_rng(Some(7), 0);
        for _ in 0..200 {
            assert_eq!(sample(&row, &input(&q, &[], &[]), &mut rng).token_id, 1);
        }
    }

    #[test]
    fn draw_walks_cumulative_mass() {
        let l = vec![0.0, NEG, 0.0];
        assert_eq!(draw(&l, 0.0), Some(0));
        assert_eq!(draw(&l, 0.49), Some(0));
        assert_eq!(draw(&l, 0.51), Some(2));
        assert_eq!(draw(&l, 0.999_999), Some(2));
        assert_eq!(draw(&[NEG, NEG], 0.5), None);
    }

    #[test]
    fn logprobs_are_raw_normalised_and_sorted() {
        let mut p = params();
        p.temperature = 0.0;
        p.repetition_penalty = 10.0;
        p.logprobs = Some(3);
        let row = vec![1.0, 3.0, 2.0, -1.0, 3.0];
        let s = sample(&row, &input(&p, &[1], &[]), &mut sample_rng(Some(0), 0));
        let lp = s.logprob.unwrap();
        // Raw logprobs: the penalty changed the choice, not the reported numbers.
        assert_eq!(s.token_id, 4);
        let full = log_softmax(&row);
        let sum: f64 = full.iter().map(|&x| (x as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "sum = {sum}");
        assert_eq!(lp.logprob, full[4]);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.token_id).collect();
        assert_eq!(ids, vec![1, 4, 2]);
        assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(log_softmax(&[NEG, NEG]).iter().all(|x| *x == NEG));
        assert!(top_logprobs(&full, 0).is_empty());
    }
}
