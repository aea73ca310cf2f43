//! GGUF tensor types that candle's reader does not know.
//!
//! candle's `gguf_file::Content::read` stops at the first tensor whose
//! `ggml_type` has no `GgmlDType`. Two of them fill llama.cpp's popular
//! files: IQ4_NL and IQ4_XS, 4-bit indices into a fixed non-linear table of
//! 16 int8 values, scaled by an f16 per 32 values (IQ4_NL) or by an f16 per
//! 256 values times a 6-bit sub-scale per 32 (IQ4_XS). On the CPU their
//! matrices are held as they are stored and run on IQ4 kernels
//! ([`crate::quant::BlockType`]). Where a tensor is read as a candle
//! `QTensor` instead (a GPU), it is transcoded to Q8_0, whose int8 values
//! hold the table's entries exactly ([`Iq4::read_q8_0`]): IQ4_NL is exact;
//! IQ4_XS's per-32 scale `d * (ls - 32)` is rounded to f16 (at most 2^-11
//! relative), at 8.5 bits per weight.
//!
//! The header is read in two passes: [`scan`] walks it (skipping metadata
//! values) to find such tensors' type fields, then candle's reader parses a
//! copy of the header with those fields set to Q8_0, the type the tensors
//! are read as. Their offsets stay the file's. Any other unknown type is
//! refused with its llama.cpp name ([`explain_tensor_type`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file;
use half::f16;

use crate::quant::{iq4xs_scale, BlockType, IQ4_VALUES};

/// llama.cpp's names for the `ggml_type` ids that candela does not read
/// (candle knows F32, F16, BF16, Q4_0 to Q8_1 and Q2_K to Q8_K; IQ4_NL and
/// IQ4_XS are [`Iq4`]).
const UNREAD_GGML_TYPES: &[(u32, &str)] = &[
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

/// candle's "unknown dtype for tensor N" as what a user can act on: the
/// type's name and the formats that load.
pub fn explain_tensor_type(message: String) -> String {
    let Some(id) = message
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|n| n.trim().parse::<u32>().ok())
    else {
        return message;
    };
    let name = UNREAD_GGML_TYPES
        .iter()
        .find(|t| t.0 == id)
        .map_or_else(|| format!("type {id}"), |t| format!("{} (type {id})", t.1));
    format!(
        "a tensor is stored as {name}, which candela does not read; GGUF files \
         of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ4_NL or \
         IQ4_XS tensors load (Q4_K_M and Q8_0 files are the usual choices)"
    )
}

/// `ggml_type` ids.
const IQ4_NL_ID: u32 = 20;
const IQ4_XS_ID: u32 = 23;
const Q8_0_ID: u32 = 8;
/// Bytes of a Q8_0 block (f16 scale + 32 int8) of 32 values.
const Q8_0_BLOCK: usize = 34;

/// The IQ4 formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Iq4 {
    /// Blocks of 32: f16 `d`, 16 bytes of index pairs.
    Nl,
    /// Super-blocks of 256: f16 `d`, u16 high and 4 bytes of low sub-scale
    /// bits (6 bits per 32 values), 128 bytes of index pairs.
    Xs,
}

impl Iq4 {
    fn from_id(id: u32) -> Option<Self> {
        match id {
            IQ4_NL_ID => Some(Self::Nl),
            IQ4_XS_ID => Some(Self::Xs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Nl => "IQ4_NL",
            Self::Xs => "IQ4_XS",
        }
    }

    /// The block type the CPU kernels hold it as.
    pub fn block_type(self) -> BlockType {
        match self {
            Self::Nl => BlockType::Iq4Nl,
            Self::Xs => BlockType::Iq4Xs,
        }
    }

    /// Bytes in the file of `rows` rows of `k` values; `None` where a row is
    /// not whole blocks (or the size overflows).
    pub fn stored_bytes(self, rows: usize, k: usize) -> Option<usize> {
        self.block_type().row_bytes(rows, k)
    }

    /// Bytes of `elems` values as Q8_0.
    pub fn q8_0_bytes(elems: usize) -> usize {
        elems / 32 * Q8_0_BLOCK
    }

    /// `rows` rows of `k` values of this format, read from `file` where it
    /// stands, into `dst` as Q8_0, 8 MiB at a time: a buffer the size of
    /// the matrix would be fresh memory to fault in, and page faults were
    /// most of an IQ4_XS 1.5B model's load time on a 2-vCPU VM.
    pub fn read_q8_0(
        self,
        file: &mut impl Read,
        rows: usize,
        k: usize,
        dst: &mut [u8],
    ) -> std::io::Result<()> {
        let stored = self
            .stored_bytes(1, k)
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let q8 = Self::q8_0_bytes(k);
        let chunk = ((8 << 20) / stored.max(1)).clamp(1, rows.max(1));
        let mut buf = vec![0; chunk * stored];
        for r0 in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - r0);
            let part = &mut buf[..n * stored];
            file.read_exact(part)?;
            self.to_q8_0(part, &mut dst[r0 * q8..(r0 + n) * q8]);
        }
        Ok(())
    }

    /// Whole blocks `src` of this format as the Q8_0 blocks of the same
    /// values, into `dst` (`Iq4::q8_0_bytes` of them), on every core.
    pub fn to_q8_0(self, src: &[u8], dst: &mut [u8]) {
        use rayon::prelude::*;
        // 2^18 values a task.
        let t = self.block_type();
        let (values, bytes) = (t.block_size(), t.type_size());
        let per_task = (1 << 18) / values;
        src.par_chunks(per_task * bytes)
            .zip(dst.par_chunks_mut(per_task * values / 32 * Q8_0_BLOCK))
            .for_each(|(src, dst)| self.blocks_to_q8_0(src, dst));
    }

    fn blocks_to_q8_0(self, src: &[u8], dst: &mut [u8]) {
        // Q8_0's values are in the same order as the 4-bit pairs: the low
        // nibbles of 16 bytes are values 0-15, the high ones 16-31.
        fn put(d: f16, qs: &[u8], out: &mut [u8]) {
            out[..2].copy_from_slice(&d.to_le_bytes());
            for (j, &q) in qs.iter().enumerate() {
                out[2 + j] = IQ4_VALUES[(q & 15) as usize] as u8;
                out[18 + j] = IQ4_VALUES[(q >> 4) as usize] as u8;
            }
        }
        let f16_at = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        match self {
            Self::Nl => {
                for (b, out) in src.chunks_exact(18).zip(dst.chunks_exact_mut(Q8_0_BLOCK)) {
                    put(f16_at(b), &b[2..], out);
                }
            }
            Self::Xs => {
                let mut outs = dst.chunks_exact_mut(Q8_0_BLOCK);
                for b in src.chunks_exact(136) {
                    let d = f16_at(b).to_f32();
                    for (i, qs) in b[8..].chunks_exact(16).enumerate() {
                        let ls = iq4xs_scale(b, i);
                        let out = outs.next().expect("dst holds the Q8_0 blocks");
                        put(f16::from_f32(d * ls as f32), qs, out);
                    }
                }
            }
        }
    }
}

/// The header of the GGUF file `file`, parsed by candle, and the tensors
/// that are stored as IQ4 (presented in it as Q8_0, at their own offsets).
pub fn read_content<R: Read + Seek>(
    file: &mut R,
) -> candle_core::Result<(gguf_file::Content, HashMap<String, Iq4>)> {
    let found = scan(&mut *file).ok().filter(|(_, f)| !f.is_empty());
    file.seek(SeekFrom::Start(0))?;
    // No IQ4 tensor, or a header the scan does not follow: candle reads
    // (or refuses) the file itself.
    let Some((end, found)) = found else {
        return Ok((gguf_file::Content::read(file)?, HashMap::new()));
    };
    let mut header = vec![0; end as usize];
    file.read_exact(&mut header)?;
    for (at, _, _) in &found {
        header[*at as usize..*at as usize + 4].copy_from_slice(&Q8_0_ID.to_le_bytes());
    }
    let content = gguf_file::Content::read(&mut Cursor::new(header))?;
    let kinds = found
        .into_iter()
        .map(|(_, name, kind)| (name, kind))
        .collect();
    Ok((content, kinds))
}

/// A walk over a GGUF header that reads only what locating the tensors'
/// type fields needs, every length checked against the file's.
struct Walk<R> {
    r: BufReader<R>,
    at: u64,
    len: u64,
    /// GGUF v2+: u64 lengths (v1: u32).
    wide: bool,
}

impl<R: Read + Seek> Walk<R> {
    fn read(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        self.r.read_exact(dst)?;
        self.at += dst.len() as u64;
        Ok(())
    }

    fn u32(&mut self) -> std::io::Result<u32> {
        let mut b = [0; 4];
        self.read(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn length(&mut self) -> std::io::Result<u64> {
        if !self.wide {
            return self.u32().map(u64::from);
        }
        let mut b = [0; 8];
        self.read(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        if n > self.len - self.at {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // Short skips within the buffer; others seek.
        if n as usize <= self.r.buffer().len() {
            self.r.consume(n as usize);
        } else {
            self.r.seek_relative(n as i64)?;
        }
        self.at += n;
        Ok(())
    }

    /// Skips one metadata value of type `ty`.
    fn value(&mut self, ty: u32, depth: usize) -> std::io::Result<()> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        let bad = || std::io::Error::from(std::io::ErrorKind::InvalidData);
        match ty {
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 if depth < 4 => {
                let elem = self.u32()?;
                let n = self.length()?;
                match fixed(elem) {
                    Some(size) => self.skip(n.checked_mul(size).ok_or_else(bad)?),
                    // Each element takes at least a byte: a count the file
                    // cannot hold is refused before the loop.
                    None if n <= self.len - self.at => {
                        (0..n).try_for_each(|_| self.value(elem, depth + 1))
                    }
                    None => Err(bad()),
                }
            }
            ty => self.skip(fixed(ty).ok_or_else(bad)?),
        }
    }
}

/// Where an IQ4 tensor's type field is, its name and its format.
type Found = (u64, String, Iq4);

/// The end of `file`'s tensor infos, and each IQ4 tensor's [`Found`].
fn scan<R: Read + Seek>(file: &mut R) -> std::io::Result<(u64, Vec<Found>)> {
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    let mut w = Walk {
        r: BufReader::with_capacity(1 << 16, file),
        at: 0,
        len,
        wide: true,
    };
    let bad = || std::io::Error::from(std::io::ErrorKind::InvalidData);
    if w.u32()? != u32::from_le_bytes(*b"GGUF") {
        return Err(bad());
    }
    w.wide = match w.u32()? {
        1 => false,
        2 | 3 => true,
        _ => return Err(bad()),
    };
    let tensors = w.length()?;
    let entries = w.length()?;
    for _ in 0..entries {
        let key = w.length()?;
        w.skip(key)?;
        let ty = w.u32()?;
        w.value(ty, 0)?;
    }
    let mut found = Vec::new();
    for _ in 0..tensors.min(len) {
        let n = w.length()?;
        if n > (len - w.at).min(1 << 16) {
            return Err(bad());
        }
        let mut name = vec![0; n as usize];
        w.read(&mut name)?;
        // As candle reads names: trailing NULs dropped.
        while name.last() == Some(&0) {
            name.pop();
        }
        let dims = w.u32()?;
        if dims > 4 {
            return Err(bad());
        }
        w.skip(u64::from(dims) * if w.wide { 8 } else { 4 })?;
        let at = w.at;
        if let Some(kind) = Iq4::from_id(w.u32()?) {
            found.push((at, String::from_utf8_lossy(&name).into_owned(), kind));
        }
        w.skip(8)?;
    }
    Ok((w.at, found))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Seeded random IQ4 blocks decoded by llama.cpp's gguf-py
    /// (fixtures/kquants, scripts/make_kquant_reference.py): transcoded to
    /// Q8_0 and decoded by the Q8_0 reader, they are its values, exactly
    /// for IQ4_NL and up to the f16 rounding of the sub-block scale for
    /// IQ4_XS.
    #[test]
    fn iq4_blocks_transcode_to_llama_cpps_values() -> candle_core::Result<()> {
        use crate::quant::BlockMatrix;
        use candle_core::quantized::ggml_file::qtensor_from_ggml;
        let dev = candle_core::Device::Cpu;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/kquants/reference.safetensors"
        );
        let r = candle_core::safetensors::load(path, &dev)?;
        for (name, kind, rel) in [
            ("iq4_nl", Iq4::Nl, 0.0),
            ("iq4_xs", Iq4::Xs, 0.5f32.powi(11)),
        ] {
            let blocks = r[&format!("{name}.blocks")].to_vec2::<u8>()?;
            let want = r[&format!("{name}.values")].to_vec2::<f32>()?;
            let (n, k) = (want.len(), want[0].len());
            assert_eq!(kind.stored_bytes(n, k), Some(blocks.concat().len()));
            let mut q8 = vec![0; Iq4::q8_0_bytes(n * k)];
            kind.to_q8_0(&blocks.concat(), &mut q8);
            let q = qtensor_from_ggml(GgmlDType::Q8_0, &q8, vec![n, k], &dev)?;
            let bm = BlockMatrix::from_qtensor(&q)?.expect("Q8_0 is a block type");
            let mut got = vec![0f32; k];
            let mut worst = 0f32;
            for (i, w) in want.iter().enumerate() {
                bm.dequantize_row(i, &mut got)?;
                for (j, (g, w)) in got.iter().zip(w).enumerate() {
                    assert!(
                        (g - w).abs() <= rel * w.abs(),
                        "{name} row {i} value {j}: {g} vs llama.cpp's {w}"
                    );
                    worst = worst.max((g - w).abs() / w.abs().max(f32::MIN_POSITIVE));
                }
            }
            eprintln!("{name}: largest relative difference from gguf-py {worst:.2e}");
        }
        // A row that is not whole blocks has no size.
        assert_eq!(Iq4::Xs.stored_bytes(2, 32), None);
        assert_eq!(Iq4::Nl.stored_bytes(2, 32), Some(36));
        Ok(())
    }

    /// The fixture's header lists its IQ4 tensors as Q8_0; cut short or
    /// with bytes changed, it is an error (or another reading), never a
    /// panic or an allocation the file cannot back.
    #[test]
    fn iq4_headers_read_and_damaged_ones_are_errors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/llama-iq4/model.gguf"
        );
        let bytes = std::fs::read(path).unwrap();
        let (content, iq4) = read_content(&mut Cursor::new(&bytes)).unwrap();
        let count = |k| iq4.values().filter(|&&v| v == k).count();
        assert_eq!((count(Iq4::Nl), count(Iq4::Xs)), (3, 12));
        assert_eq!(iq4["token_embd.weight"], Iq4::Nl);
        for name in iq4.keys() {
            assert_eq!(content.tensor_infos[name].ggml_dtype, GgmlDType::Q8_0);
        }
        let end = content.tensor_data_offset as usize;
        for cut in (0..end).step_by(end / 23) {
            assert!(read_content(&mut Cursor::new(&bytes[..cut])).is_err());
        }
        // The tensor infos are the header's last ~1.5 KB.
        let mut bad = bytes[..end].to_vec();
        for at in (end - 1600..end).step_by(23) {
            for v in [0xff, 0x00] {
                let keep = bad[at];
                bad[at] = v;
                let _ = read_content(&mut Cursor::new(&bad));
                bad[at] = keep;
            }
        }
    }
}
