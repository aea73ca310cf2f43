//! M-RoPE positions of a prompt (Hugging Face's `get_rope_index`): text
//! tokens advance one position on all three axes; a media item's merged
//! patches take (start + time, start + row, start + column), and the text
//! after it continues at the item's largest position + 1.
//!
//! That last rule is Qwen's released code and vLLM's. transformers 5 instead
//! continues at `start + max(rows, columns)`, which differs only when a
//! video's time positions outrun its rows and columns (many frames on a small
//! grid); the fixtures avoid that case and check that both rules agree there.

use std::sync::Arc;

use candela_core::request::MropePositions;

use crate::error::{ModelError, Result};

/// One media item of the prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MediaSpan {
    /// Index of its first placeholder token.
    pub offset: usize,
    /// (t, h, w) in patches, before merging.
    pub grid_thw: [usize; 3],
    /// Time positions per temporal patch: 1, or for Qwen2.5-VL video
    /// `tokens_per_second * second_per_grid_t` (fractions truncated per patch).
    pub time_interval: f64,
}

impl MediaSpan {
    /// Placeholder tokens of the item (`t * h * w / merge^2`).
    pub fn len(&self, merge: usize) -> usize {
        let [t, h, w] = self.grid_thw;
        t * (h / merge) * (w / merge)
    }

    pub fn is_empty(&self, merge: usize) -> bool {
        self.len(merge) == 0
    }
}

/// 3-D positions of a `num_tokens` prompt whose media items are `spans`
/// (sorted by offset, non-overlapping, inside the prompt).
pub fn mrope_positions(
    num_tokens: usize,
    spans: &[MediaSpan],
    merge: usize,
) -> Result<MropePositions> {
    let bad = |m: String| ModelError::Media(m);
    if merge == 0 {
        return Err(bad("spatial merge size must be positive".into()));
    }
    let mut out: Vec<[u32; 3]> = Vec::with_capacity(num_tokens);
    let mut next: u64 = 0;
    let mut max_seen: u64 = 0;
    let push = |out: &mut Vec<[u32; 3]>, p: [u64; 3]| -> Result<()> {
        let c = |v: u64| {
            u32::try_from(v).map_err(|_| ModelError::Media("M-RoPE position overflows".into()))
        };
        out.push([c(p[0])?, c(p[1])?, c(p[2])?]);
        Ok(())
    };
    for s in spans {
        let [t, h, w] = s.grid_thw;
        if h % merge != 0 || w % merge != 0 {
            return Err(bad(format!(
                "grid {:?} is not a multiple of the merge size {merge}",
                s.grid_thw
            )));
        }
        if s.offset < out.len() || s.offset + s.len(merge) > num_tokens {
            return Err(bad(format!(
                "media item at token {} ({} tokens) overlaps another or runs past the prompt's {num_tokens} tokens",
                s.offset,
                s.len(merge)
            )));
        }
        if !(s.time_interval.is_finite() && s.time_interval >= 0.0) {
            return Err(bad(format!(
                "time interval {} must be finite and >= 0",
                s.time_interval
            )));
        }
        while out.len() < s.offset {
            push(&mut out, [next; 3])?;
            max_seen = max_seen.max(next);
            next += 1;
        }
        let (lh, lw) = (h / merge, w / merge);
        // f32 as torch computes `arange(t) * interval`, then truncated.
        let interval = s.time_interval as f32;
        let mut item_max = next;
        for ti in 0..t {
            let dt = (ti as f32 * interval) as u64;
            for hi in 0..lh {
                for wi in 0..lw {
                    let p = [next + dt, next + hi as u64, next + wi as u64];
                    item_max = item_max.max(p[0]).max(p[1]).max(p[2]);
                    push(&mut out, p)?;
                }
            }
        }
        if s.len(merge) > 0 {
            max_seen = max_seen.max(item_max);
            next = item_max + 1;
        }
    }
    while out.len() < num_tokens {
        push(&mut out, [next; 3])?;
        max_seen = max_seen.max(next);
        next += 1;
    }
    let delta = if num_tokens == 0 {
        0
    } else {
        max_seen as i64 + 1 - num_tokens as i64
    };
    Ok(MropePositions {
        prompt: Arc::from(out),
        delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axes(m: &MropePositions) -> [Vec<u32>; 3] {
        let mut a: [Vec<u32>; 3] = Default::default();
        for p in m.prompt.iter() {
            for k in 0..3 {
                a[k].push(p[k]);
            }
        }
        a
    }

    #[test]
    fn image_then_text() {
        // 2 text, a 1x4x6 grid (2x3 merged), 2 text.
        let span = MediaSpan {
            offset: 2,
            grid_thw: [1, 4, 6],
            time_interval: 1.0,
        };
        let m = mrope_positions(10, &[span], 2).unwrap();
        let [t, h, w] = axes(&m);
        assert_eq!(t, vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(h, vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(w, vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        assert_eq!(m.delta, 7 - 10);
        assert_eq!(m.at(10), [7, 7, 7]);
    }

    #[test]
    fn video_time_scaling_and_long_videos() {
        // Qwen2.5-VL: 3 temporal patches, interval 2.5 -> times 0, 2, 5.
        let span = MediaSpan {
            offset: 1,
            grid_thw: [3, 2, 2],
            time_interval: 2.5,
        };
        let m = mrope_positions(5, &[span], 2).unwrap();
        let [t, h, w] = axes(&m);
        assert_eq!(t, vec![0, 1, 3, 6, 7]);
        assert_eq!(h, vec![0, 1, 1, 1, 7]);
        assert_eq!(w, vec![0, 1, 1, 1, 7]);
        // Text after the video continues past its last time position.
        assert_eq!(m.delta, 8 - 5);
    }

    #[test]
    fn adjacent_items_and_bad_spans() {
        let a = MediaSpan {
            offset: 0,
            grid_thw: [1, 2, 2],
            time_interval: 1.0,
        };
        let b = MediaSpan {
            offset: 1,
            grid_thw: [1, 2, 4],
            time_interval: 1.0,
        };
        let m = mrope_positions(3, &[a, b], 2).unwrap();
        assert_eq!(m.prompt.to_vec(), vec![[0, 0, 0], [1, 1, 1], [1, 1, 2]]);
        assert!(
            mrope_positions(2, &[a, b], 2).is_err(),
            "runs past the prompt"
        );
        assert!(mrope_positions(3, &[b, a], 2).is_err(), "out of order");
        let odd = MediaSpan {
            offset: 0,
            grid_thw: [1, 3, 2],
            time_interval: 1.0,
        };
        assert!(mrope_positions(3, &[odd], 2).is_err());
    }
}
