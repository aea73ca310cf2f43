//! Host-side planning of the kernels' work: the flat arrays they read (block
//! tables, query offsets, work lists) and their launch shapes, computed from
//! a batch's layout. Plain Rust, so it is tested on CPU; the constants mirror
//! kernels/attention.cuh and kernels/sampling.cuh.

/// Threads of the attention kernels' CTAs.
pub const ATTN_THREADS: u32 = 128;
/// Query heads (of one kv head's group) handled by one decode CTA.
pub const DECODE_MAX_HEADS: usize = 8;
/// Keys per decode partition; longer contexts are split and merged.
pub const DECODE_PARTITION: usize = 512;
/// Query tokens per prefill CTA.
pub const PREFILL_QUERIES: usize = 16;
/// Threads of a sampling CTA (one per logits row).
pub const SAMPLE_THREADS: u32 = 1024;
/// Head sizes the attention kernels are compiled for (8 to 32: the tiny
/// test checkpoints; the others: real models).
pub const HEAD_DIMS: [usize; 8] = [8, 16, 32, 64, 80, 96, 128, 256];

/// CUDA's limit on grid dimensions y and z.
const GRID_YZ_MAX: usize = 65_535;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the CUDA attention kernels support head_dim 8, 16, 32, 64, 80, 96, 128 or 256, not {0}"
    )]
    HeadDim(usize),
    #[error("{heads} query heads are not a multiple of {kv_heads} kv heads")]
    Heads { heads: usize, kv_heads: usize },
    #[error("block_size must be positive")]
    BlockSize,
    #[error("sequence {seq}: {message}")]
    Seq { seq: usize, message: String },
    #[error("{what} = {value} is beyond what one kernel launch handles ({max})")]
    TooLarge {
        what: &'static str,
        value: usize,
        max: usize,
    },
    #[error("sampling: row {row} is out of range ({rows} logits rows)")]
    SampleRow { row: u32, rows: usize },
    #[error("sampling: {name} = {value} is out of range")]
    SampleParam { name: &'static str, value: f32 },
}

fn fit_u32(what: &'static str, value: usize) -> Result<u32, PlanError> {
    u32::try_from(value).map_err(|_| PlanError::TooLarge {
        what,
        value,
        max: u32::MAX as usize,
    })
}

fn fit_grid(what: &'static str, value: usize) -> Result<u32, PlanError> {
    if value > GRID_YZ_MAX {
        return Err(PlanError::TooLarge {
            what,
            value,
            max: GRID_YZ_MAX,
        });
    }
    Ok(value as u32)
}

/// Grid and block dimensions of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

/// How query heads map onto kv heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Query heads per kv head.
    pub group: usize,
    /// Decode CTAs per kv head (groups larger than [`DECODE_MAX_HEADS`] are split).
    pub head_chunks: usize,
}

impl HeadLayout {
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self, PlanError> {
        if !HEAD_DIMS.contains(&head_dim) {
            return Err(PlanError::HeadDim(head_dim));
        }
        if num_kv_heads == 0 || num_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(PlanError::Heads {
                heads: num_heads,
                kv_heads: num_kv_heads,
            });
        }
        let group = num_heads / num_kv_heads;
        Ok(Self {
            num_heads,
            num_kv_heads,
            head_dim,
            group,
            head_chunks: group.div_ceil(DECODE_MAX_HEADS),
        })
    }
}

/// One sequence of the batch, as [`AttentionPlan::new`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct PlanSeq<'a> {
    /// Index of its first new token in the batch.
    pub query_start: usize,
    /// New tokens this step.
    pub query_len: usize,
    /// Keys in the cache once this step's K/V are written.
    pub context_len: usize,
    /// Block ids of positions `0..context_len`, in order.
    pub block_table: &'a [u32],
}

/// The arrays the attention kernels read, and their work lists.
///
/// Sequences with one new token (decode) go to the decode kernel, one work
/// item per token; sequences with more (prefill, chunked prefill, a prompt
/// on a cached prefix) go to the prefill kernel in tiles of
/// [`PREFILL_QUERIES`] tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionPlan {
    pub num_tokens: usize,
    pub block_size: u32,
    /// Row length of `block_tables`: the most blocks any sequence uses.
    pub max_blocks: u32,
    /// `[num_seqs * max_blocks]`, each row padded with 0 (never read: the
    /// kernels only look up positions below the sequence's context).
    pub block_tables: Vec<u32>,
    /// Offset of each sequence's first new token, then the total (`num_seqs + 1`).
    pub query_starts: Vec<u32>,
    pub context_lens: Vec<u32>,
    /// `(token, seq, keys)` per decode token: the token attends to keys `0..keys`.
    pub decode_items: Vec<u32>,
    /// Partitions of the longest decode context (grid z of the decode launch).
    pub max_partitions: u32,
    /// `(seq, first query within the sequence's new tokens)` per prefill tile.
    pub prefill_tiles: Vec<u32>,
}

impl AttentionPlan {
    pub fn new(
        seqs: &[PlanSeq<'_>],
        block_size: usize,
        num_tokens: usize,
    ) -> Result<Self, PlanError> {
        if block_size == 0 {
            return Err(PlanError::BlockSize);
        }
        let bs = fit_u32("block_size", block_size)?;
        fit_u32("tokens in the batch", num_tokens)?;
        let mut max_blocks = 0usize;
        let mut next = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            let bad = |message: String| PlanError::Seq { seq: i, message };
            if s.query_start != next {
                return Err(bad(format!(
                    "starts at token {} but the previous sequence ends at {next}",
                    s.query_start
                )));
            }
            if s.query_len > s.context_len {
                return Err(bad(format!(
                    "{} new tokens but a context of {}",
                    s.query_len, s.context_len
                )));
            }
            fit_u32("context length", s.context_len)?;
            let blocks = s.context_len.div_ceil(block_size);
            if s.block_table.len() < blocks {
                return Err(bad(format!(
                    "needs {blocks} blocks for {} tokens, its block table has {}",
                    s.context_len,
                    s.block_table.len()
                )));
            }
            max_blocks = max_blocks.max(blocks);
            next += s.query_len;
        }
        if next != num_tokens {
            return Err(PlanError::Seq {
                seq: seqs.len(),
                message: format!("sequences cover {next} tokens, the batch has {num_tokens}"),
            });
        }
        fit_u32("block table entries", seqs.len().saturating_mul(max_blocks))?;

        let mut block_tables = vec![0u32; seqs.len() * max_blocks];
        let mut query_starts = Vec::with_capacity(seqs.len() + 1);
        let mut context_lens = Vec::with_capacity(seqs.len());
        let mut decode_items = Vec::new();
        let mut prefill_tiles = Vec::new();
        let mut max_partitions = 1usize;
        for (i, s) in seqs.iter().enumerate() {
            let blocks = s.context_len.div_ceil(block_size);
            block_tables[i * max_blocks..i * max_blocks + blocks]
                .copy_from_slice(&s.block_table[..blocks]);
            query_starts.push(s.query_start as u32);
            context_lens.push(s.context_len as u32);
            match s.query_len {
                0 => {}
                1 => {
                    decode_items.extend([s.query_start as u32, i as u32, s.context_len as u32]);
                    max_partitions = max_partitions.max(s.context_len.div_ceil(DECODE_PARTITION));
                }
                n => {
                    for q0 in (0..n).step_by(PREFILL_QUERIES) {
                        prefill_tiles.extend([i as u32, q0 as u32]);
                    }
                }
            }
        }
        query_starts.push(num_tokens as u32);
        Ok(Self {
            num_tokens,
            block_size: bs,
            max_blocks: max_blocks as u32,
            block_tables,
            query_starts,
            context_lens,
            decode_items,
            max_partitions: fit_grid("decode partitions (context / 512)", max_partitions)?,
            prefill_tiles,
        })
    }

    pub fn num_decode(&self) -> usize {
        self.decode_items.len() / 3
    }

    pub fn num_prefill_tiles(&self) -> usize {
        self.prefill_tiles.len() / 2
    }

    /// The decode launch: grid (decode tokens, kv heads x head chunks, partitions).
    pub fn decode_launch(&self, heads: &HeadLayout) -> Result<Option<Launch>, PlanError> {
        if self.num_decode() == 0 {
            return Ok(None);
        }
        Ok(Some(Launch {
            grid: (
                fit_u32("decode tokens", self.num_decode())?,
                fit_grid(
                    "kv heads x head chunks",
                    heads.num_kv_heads * heads.head_chunks,
                )?,
                self.max_partitions,
            ),
            block: (ATTN_THREADS, 1, 1),
        }))
    }

    /// Merging the decode partitions: grid (decode tokens, query heads); only
    /// when some context spans more than one partition.
    pub fn decode_reduce_launch(&self, heads: &HeadLayout) -> Result<Option<Launch>, PlanError> {
        if self.num_decode() == 0 || self.max_partitions <= 1 {
            return Ok(None);
        }
        Ok(Some(Launch {
            grid: (
                fit_u32("decode tokens", self.num_decode())?,
                fit_grid("query heads", heads.num_heads)?,
                1,
            ),
            block: (ATTN_THREADS, 1, 1),
        }))
    }

    /// Floats of the decode partials: `[tokens, heads, partitions, head_dim]`
    /// outputs and `[tokens, heads, partitions, 2]` (max, sum) statistics.
    pub fn decode_partial_lens(&self, heads: &HeadLayout) -> (usize, usize) {
        if self.max_partitions <= 1 {
            return (0, 0);
        }
        let rows = self.num_decode() * heads.num_heads * self.max_partitions as usize;
        (rows * heads.head_dim, rows * 2)
    }

    /// The prefill launch: grid (tiles, query heads).
    pub fn prefill_launch(&self, heads: &HeadLayout) -> Result<Option<Launch>, PlanError> {
        if self.num_prefill_tiles() == 0 {
            return Ok(None);
        }
        Ok(Some(Launch {
            grid: (
                fit_u32("prefill tiles", self.num_prefill_tiles())?,
                fit_grid("query heads", heads.num_heads)?,
                1,
            ),
            block: (ATTN_THREADS, 1, 1),
        }))
    }
}

/// Copying `rows` new K (or V) rows into their slots: one CTA per row.
pub fn write_rows_launch(rows: usize) -> Result<Launch, PlanError> {
    Ok(Launch {
        grid: (fit_u32("new K/V rows", rows)?, 1, 1),
        block: (ATTN_THREADS, 1, 1),
    })
}

/// One row to sample on the GPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRow {
    /// Row of the logits matrix.
    pub row: u32,
    /// Below 1e-5: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// The uniform draw in [0, 1) from the sequence's own generator.
    pub uniform: f32,
}

/// Packed sampling parameters and the launch (one CTA per sampled row).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePlan {
    /// `(row, top_k)` per sampled row.
    pub params_u: Vec<u32>,
    /// `(temperature, top_p, min_p, uniform)` per sampled row.
    pub params_f: Vec<f32>,
    pub launch: Launch,
}

pub fn plan_sampling(
    rows: &[SampleRow],
    num_rows: usize,
    vocab: usize,
) -> Result<SamplePlan, PlanError> {
    fit_u32("vocabulary size", vocab)?;
    let mut params_u = Vec::with_capacity(rows.len() * 2);
    let mut params_f = Vec::with_capacity(rows.len() * 4);
    for r in rows {
        if r.row as usize >= num_rows {
            return Err(PlanError::SampleRow {
                row: r.row,
                rows: num_rows,
            });
        }
        let checks = [
            (
                "temperature",
                r.temperature,
                r.temperature.is_finite() && r.temperature >= 0.0,
            ),
            ("top_p", r.top_p, r.top_p > 0.0 && r.top_p <= 1.0),
            ("min_p", r.min_p, (0.0..=1.0).contains(&r.min_p)),
            ("uniform", r.uniform, (0.0..=1.0).contains(&r.uniform)),
        ];
        if let Some((name, value, _)) = checks.iter().find(|c| !c.2) {
            return Err(PlanError::SampleParam {
                name,
                value: *value,
            });
        }
        params_u.extend([r.row, r.top_k]);
        params_f.extend([r.temperature, r.top_p, r.min_p, r.uniform]);
    }
    Ok(SamplePlan {
        params_u,
        params_f,
        launch: Launch {
            grid: (fit_u32("sampled rows", rows.len())?, 1, 1),
            block: (SAMPLE_THREADS, 1, 1),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(query_start: usize, query_len: usize, context_len: usize, table: &[u32]) -> PlanSeq<'_> {
        PlanSeq {
            query_start,
            query_len,
            context_len,
            block_table: table,
        }
    }

    #[test]
    fn ragged_batch_splits_into_decode_items_and_prefill_tiles() {
        // A decode on a long context, a fresh 20-token prompt, a 3-token chunk
        // on a cached prefix, and a sequence with nothing new this step.
        let (t0, t1, t2, t3) = ([7u32, 3, 9, 4, 11], [1u32, 2], [5u32, 6], [8u32]);
        let seqs = [
            seq(0, 1, 1100, &t0),
            seq(1, 20, 20, &t1),
            seq(21, 3, 19, &t2),
            seq(24, 0, 4, &t3),
        ];
        let p = AttentionPlan::new(&seqs, 256, 24).unwrap();
        assert_eq!(p.max_blocks, 5);
        assert_eq!(p.query_starts, vec![0, 1, 21, 24, 24]);
        assert_eq!(p.context_lens, vec![1100, 20, 19, 4]);
        // Rows padded to max_blocks with 0.
        assert_eq!(&p.block_tables[..5], &[7, 3, 9, 4, 11]);
        assert_eq!(&p.block_tables[5..10], &[1, 0, 0, 0, 0]);
        assert_eq!(&p.block_tables[10..15], &[5, 0, 0, 0, 0]);
        assert_eq!(&p.block_tables[15..20], &[8, 0, 0, 0, 0]);
        // The decode token sees the whole context; 1100 keys = 3 partitions.
        assert_eq!(p.decode_items, vec![0, 0, 1100]);
        assert_eq!(p.max_partitions, 3);
        // 20 new tokens -> tiles at 0 and 16; 3 tokens -> one tile.
        assert_eq!(p.prefill_tiles, vec![1, 0, 1, 16, 2, 0]);

        let heads = HeadLayout::new(14, 2, 64).unwrap();
        assert_eq!((heads.group, heads.head_chunks), (7, 1));
        let d = p.decode_launch(&heads).unwrap().unwrap();
        assert_eq!(d.grid, (1, 2, 3));
        assert_eq!(d.block, (ATTN_THREADS, 1, 1));
        assert_eq!(
            p.decode_reduce_launch(&heads).unwrap().unwrap().grid,
            (1, 14, 1)
        );
        assert_eq!(p.decode_partial_lens(&heads), (14 * 3 * 64, 14 * 3 * 2));
        assert_eq!(p.prefill_launch(&heads).unwrap().unwrap().grid, (3, 14, 1));
    }

    #[test]
    fn short_contexts_need_no_merge_and_big_groups_split() {
        let t = [0u32, 1];
        let p = AttentionPlan::new(&[seq(0, 1, 30, &t), seq(1, 1, 512, &t)], 256, 2).unwrap();
        assert_eq!(p.max_partitions, 1);
        assert_eq!(p.decode_items, vec![0, 0, 30, 1, 1, 512]);
        assert!(p.prefill_tiles.is_empty());
        // 64 query heads on 4 kv heads: groups of 16 run as 2 chunks of 8.
        let heads = HeadLayout::new(64, 4, 128).unwrap();
        assert_eq!(heads.head_chunks, 2);
        assert_eq!(p.decode_launch(&heads).unwrap().unwrap().grid, (2, 8, 1));
        assert_eq!(p.decode_reduce_launch(&heads).unwrap(), None);
        assert_eq!(p.decode_partial_lens(&heads), (0, 0));
        assert_eq!(p.prefill_launch(&heads).unwrap(), None);
    }

    #[test]
    fn layouts_the_kernels_cannot_run_are_errors() {
        assert_eq!(HeadLayout::new(8, 2, 72), Err(PlanError::HeadDim(72)));
        assert!(matches!(
            HeadLayout::new(6, 4, 64),
            Err(PlanError::Heads { .. })
        ));
        assert!(matches!(
            HeadLayout::new(6, 0, 64),
            Err(PlanError::Heads { .. })
        ));
        for hd in HEAD_DIMS {
            assert!(HeadLayout::new(2, 1, hd).is_ok());
        }
        let t = [0u32];
        assert_eq!(AttentionPlan::new(&[], 0, 0), Err(PlanError::BlockSize));
        // Block table shorter than the context.
        let e = AttentionPlan::new(&[seq(0, 1, 17, &t)], 16, 1).unwrap_err();
        assert!(e.to_string().contains("needs 2 blocks"), "{e}");
        // More new tokens than context; gaps; uncovered tokens.
        assert!(AttentionPlan::new(&[seq(0, 3, 2, &t)], 16, 3).is_err());
        assert!(AttentionPlan::new(&[seq(0, 1, 1, &t), seq(2, 1, 1, &t)], 16, 3).is_err());
        assert!(AttentionPlan::new(&[seq(0, 1, 1, &t)], 16, 2).is_err());
        // Contexts needing more than 65535 partitions do not fit a grid.
        let big = vec![0u32; 65_536 * 512 / 4096 + 1];
        let e = AttentionPlan::new(&[seq(0, 1, 65_536 * 512 + 1, &big)], 4096, 1).unwrap_err();
        assert!(matches!(e, PlanError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn write_rows_is_one_cta_per_row() {
        assert_eq!(write_rows_launch(37).unwrap().grid, (37, 1, 1));
        assert!(write_rows_launch(usize::MAX).is_err());
    }

    #[test]
    fn sampling_params_are_packed_and_checked() {
        let row = |row, temperature, top_k, top_p, min_p, uniform| SampleRow {
            row,
            temperature,
            top_k,
            top_p,
            min_p,
            uniform,
        };
        let p = plan_sampling(
            &[
                row(2, 0.7, 40, 0.9, 0.05, 0.25),
                row(0, 0.0, 0, 1.0, 0.0, 0.0),
            ],
            3,
            1000,
        )
        .unwrap();
        assert_eq!(p.params_u, vec![2, 40, 0, 0]);
        assert_eq!(p.params_f, vec![0.7, 0.9, 0.05, 0.25, 0.0, 1.0, 0.0, 0.0]);
        assert_eq!(p.launch.grid, (2, 1, 1));
        assert_eq!(p.launch.block, (SAMPLE_THREADS, 1, 1));
        assert_eq!(
            plan_sampling(&[row(3, 1.0, 0, 1.0, 0.0, 0.5)], 3, 10),
            Err(PlanError::SampleRow { row: 3, rows: 3 })
        );
        for bad in [
            row(0, -1.0, 0, 1.0, 0.0, 0.5),
            row(0, f32::NAN, 0, 1.0, 0.0, 0.5),
            row(0, 1.0, 0, 0.0, 0.0, 0.5),
            row(0, 1.0, 0, 1.5, 0.0, 0.5),
            row(0, 1.0, 0, 1.0, 2.0, 0.5),
            row(0, 1.0, 0, 1.0, 0.0, -0.1),
        ] {
            assert!(
                matches!(
                    plan_sampling(&[bad], 1, 10),
                    Err(PlanError::SampleParam { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(plan_sampling(&[], 0, 10).unwrap().params_u.is_empty());
    }
}
