//! Prefill attention on the CPU, in tiles. The per-row kernel reads every
//! key and value of the context once per (query token, head): at a few
//! thousand tokens that is memory-bound (one 3,800-token SmolLM2-135M prompt
//! took ~50 s, nearly all of it here). A tile takes the query rows of up to
//! [`TILE_ROWS`] / group consecutive tokens of one sequence with all the
//! heads of one kv group, gathers the keys and values they see through the
//! block table into contiguous f32 buffers once, and computes scores and
//! weighted values with two GEMMs; the causal (or sliding-window) softmax
//! runs row by row in between.

use super::{AttentionMetadata, AttnParams, KvElem};
use rayon::prelude::*;

/// Query rows per tile: the score tile of 64 rows over a 4,096-token
/// context is 1 MiB, about what one core's L2 holds.
const TILE_ROWS: usize = 64;
/// Sequences with at least this many new tokens in the step take the tiled
/// path; decodes and short chunks stay on the per-row kernel.
pub(super) const MIN_QUERY_LEN: usize = 8;

/// Head layout of one attention call.
pub(super) struct Heads {
    pub n_heads: usize,
    pub head_dim: usize,
    /// Query heads per kv head.
    pub group: usize,
    /// Elements per cache slot (num_kv_heads * head_dim).
    pub slot_stride: usize,
    pub params: AttnParams,
}

/// Tokens `t0..t0 + len` (batch indices) of sequence `seq`, kv head `kv_head`.
struct Tile {
    seq: usize,
    kv_head: usize,
    t0: usize,
    len: usize,
}

/// Reusable per-thread buffers: gathered keys and values, scaled queries,
/// scores.
#[derive(Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    s: Vec<f32>,
}

/// Attention for the query tokens of every sequence with at least
/// [`MIN_QUERY_LEN`] new tokens, written into `out` (`[tokens, heads,
/// head_dim]`); other tokens' rows are left as they are.
pub(super) fn attend_tiled<T: KvElem>(
    q: &[T],
    kc: &[T],
    vc: &[T],
    meta: &AttentionMetadata,
    heads: &Heads,
    out: &mut [T],
) {
    let tokens_per_tile = (TILE_ROWS / heads.group).max(1);
    let n_kv = heads.n_heads / heads.group;
    let tiles: Vec<Tile> = meta
        .seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.query_len >= MIN_QUERY_LEN)
        .flat_map(|(seq, s)| {
            let end = s.query_start + s.query_len;
            (s.query_start..end)
                .step_by(tokens_per_tile)
                .flat_map(move |t0| {
                    (0..n_kv).map(move |kv_head| Tile {
                        seq,
                        kv_head,
                        t0,
                        len: tokens_per_tile.min(end - t0),
                    })
                })
        })
        .collect();
    if tiles.is_empty() {
        return;
    }
    let results: Vec<Vec<f32>> = tiles
        .par_iter()
        .map_init(Scratch::default, |scratch, tile| {
            attend_tile(q, kc, vc, meta, heads, tile, scratch)
        })
        .collect();
    let d = heads.head_dim;
    for (tile, o) in tiles.iter().zip(results) {
        for ti in 0..tile.len {
            for hg in 0..heads.group {
                let h = tile.kv_head * heads.group + hg;
                let dst = &mut out[((tile.t0 + ti) * heads.n_heads + h) * d..][..d];
                let src = &o[(ti * heads.group + hg) * d..][..d];
                for (y, x) in dst.iter_mut().zip(src) {
                    *y = T::from_f32(*x);
                }
            }
        }
    }
}

/// One tile: rows `ti * group + hg` (token `t0 + ti`, head `kv_head *
/// group + hg`), returned as `[rows, head_dim]` f32.
fn attend_tile<T: KvElem>(
    q: &[T],
    kc: &[T],
    vc: &[T],
    meta: &AttentionMetadata,
    heads: &Heads,
    tile: &Tile,
    scratch: &mut Scratch,
) -> Vec<f32> {
    let d = heads.head_dim;
    let bs = meta.block_size;
    let table = &meta.seqs[tile.seq].block_table;
    let rows = tile.len * heads.group;
    let window = heads.params.window;
    // Keys lo..hi: from what the tile's first token sees to what its last
    // token sees; buffer row i holds key lo + i.
    let lo = meta.key_range(tile.t0, window).0;
    let hi = meta.key_range(tile.t0 + tile.len - 1, window).1;
    let n_ctx = hi - lo;

    let Scratch { k, v, q: qs, s } = scratch;
    k.resize(n_ctx * d, 0.0);
    v.resize(n_ctx * d, 0.0);
    for i in 0..n_ctx {
        let p = lo + i;
        let slot = table[p / bs] as usize * bs + p % bs;
        let off = slot * heads.slot_stride + tile.kv_head * d;
        for (dst, src) in k[i * d..][..d].iter_mut().zip(&kc[off..off + d]) {
            *dst = src.to_f32();
        }
        for (dst, src) in v[i * d..][..d].iter_mut().zip(&vc[off..off + d]) {
            *dst = src.to_f32();
        }
    }
    qs.resize(rows * d, 0.0);
    for ti in 0..tile.len {
        for hg in 0..heads.group {
            let h = tile.kv_head * heads.group + hg;
            let src = &q[((tile.t0 + ti) * heads.n_heads + h) * d..][..d];
            for (dst, x) in qs[(ti * heads.group + hg) * d..][..d].iter_mut().zip(src) {
                *dst = x.to_f32() * heads.params.scale;
            }
        }
    }

    // Scores [rows, n_ctx] = q [rows, d] . k^T.
    s.resize(rows * n_ctx, 0.0);
    // SAFETY: every pointer, extent and stride describes a buffer sized above.
    unsafe {
        crate::cpu::gemm_f32(
            (rows, n_ctx, d),
            s.as_mut_ptr(),
            n_ctx,
            qs.as_ptr(),
            d,
            k.as_ptr(),
            (1, d),
        );
    }
    // Masked softmax: token t0 + ti sees keys key_range(t0 + ti).
    for ti in 0..tile.len {
        let (a, b) = meta.key_range(tile.t0 + ti, window);
        let (a, b) = (a - lo, b - lo);
        for hg in 0..heads.group {
            let row = &mut s[(ti * heads.group + hg) * n_ctx..][..n_ctx];
            heads.params.cap_all(&mut row[a..b]);
            crate::softmax::softmax_in_place(&mut row[a..b]);
            row[..a].fill(0.0);
            row[b..].fill(0.0);
        }
    }
    // Output [rows, d] = probabilities [rows, n_ctx] . v [n_ctx, d].
    let mut o = vec![0f32; rows * d];
    // SAFETY: as above.
    unsafe {
        crate::cpu::gemm_f32(
            (rows, d, n_ctx),
            o.as_mut_ptr(),
            d,
            s.as_ptr(),
            n_ctx,
            v.as_ptr(),
            (d, 1),
        );
    }
    o
}
