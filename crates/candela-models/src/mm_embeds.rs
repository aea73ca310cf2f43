//! Precomputed embeddings sent by the caller (vLLM's `image_embeds` and
//! `audio_embeds`): the encoder's output for one item, `(feature_tokens,
//! hidden)`, with an image's `(t, h, w)` patch grid so its M-RoPE positions
//! can be laid out. They come as a `torch.save` archive, a `.npy` file or a
//! safetensors blob (see [`crate::tensor_files`]).
//!
//! Every check here is on caller data: a mismatch is a [`MediaError::Invalid`]
//! (HTTP 400) naming what was expected and what came, never a panic.

use candela_media::{MediaError, Modality};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::Dtype;

use crate::tensor_files::{read_tensors, RawTensor};

/// The name of the tensor in a blob of named tensors (and of the request
/// field): `image_embeds`, `audio_embeds`.
pub fn embeds_key(modality: Modality) -> String {
    format!("{}_embeds", modality.name())
}

/// The grid's name beside image embeddings.
pub const GRID_KEY: &str = "image_grid_thw";

fn invalid(msg: impl Into<String>) -> MediaError {
    MediaError::Invalid(msg.into())
}

/// Embeddings (f32, CPU) and the grid, if the blob holds one.
pub struct ParsedEmbeds {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
    pub grid_thw: Option<[usize; 3]>,
}

fn floats(t: &RawTensor, what: &str) -> Result<Vec<f32>, MediaError> {
    let chunks = |n: usize| t.data.chunks_exact(n);
    Ok(match t.dtype {
        Dtype::F32 => chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => chunks(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(invalid(format!(
                "{what} must be a float tensor (F32, F16 or BF16), got dtype {other:?}"
            )))
        }
    })
}

fn ints(t: &RawTensor) -> Result<Vec<i64>, MediaError> {
    let chunks = |n: usize| t.data.chunks_exact(n);
    Ok(match t.dtype {
        Dtype::I64 => chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect(),
        Dtype::U64 => chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as i64)
            .collect(),
        Dtype::I32 => chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
            .collect(),
        Dtype::U32 => chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as i64)
            .collect(),
        Dtype::I16 => chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        Dtype::U16 => chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        Dtype::I8 => t.data.iter().map(|&b| b as i8 as i64).collect(),
        Dtype::U8 => t.data.iter().map(|&b| b as i64).collect(),
        other => {
            return Err(invalid(format!(
                "{GRID_KEY} must be an integer tensor, got dtype {other:?}"
            )))
        }
    })
}

/// A grid given as numbers: exactly three positive integers.
pub fn grid_from(values: &[i64]) -> Result<[usize; 3], MediaError> {
    match values {
        &[t, h, w] if t > 0 && h > 0 && w > 0 => Ok([t as usize, h as usize, w as usize]),
        _ => Err(invalid(format!(
            "{GRID_KEY} must be three positive integers [t, h, w], got {values:?}"
        ))),
    }
}

fn grid_of(t: &RawTensor) -> Result<[usize; 3], MediaError> {
    if !matches!(t.shape.as_slice(), [3] | [1, 3]) {
        return Err(invalid(format!(
            "{GRID_KEY} must have shape (3,) or (1, 3), got {:?}",
            t.shape
        )));
    }
    grid_from(&ints(t)?)
}

/// Read a modality's embeddings from a blob: a file of one tensor, or named
/// tensors holding `<modality>_embeds` (and, for images, maybe `image_grid_thw`).
pub fn parse_embeds(bytes: &[u8], modality: Modality) -> Result<ParsedEmbeds, MediaError> {
    let key = embeds_key(modality);
    let tensors = read_tensors(bytes, &key)?;
    let embeds = match tensors.as_slice() {
        [(None, t)] => t,
        named => named
            .iter()
            .find(|(n, _)| n.as_deref() == Some(key.as_str()))
            .map(|(_, t)| t)
            .ok_or_else(|| {
                let names: Vec<&str> = named.iter().filter_map(|(n, _)| n.as_deref()).collect();
                invalid(format!(
                    "the blob has no tensor named {key:?} (it holds {names:?})"
                ))
            })?,
    };
    let grid = tensors
        .iter()
        .find(|(n, _)| n.as_deref() == Some(GRID_KEY))
        .map(|(_, g)| grid_of(g))
        .transpose()?;
    Ok(ParsedEmbeds {
        data: floats(embeds, &key)?,
        shape: embeds.shape.clone(),
        grid_thw: grid,
    })
}

/// Read an `image_grid_thw` sent as its own blob (vLLM's dict form).
pub fn parse_grid(bytes: &[u8]) -> Result<[usize; 3], MediaError> {
    let tensors = read_tensors(bytes, GRID_KEY)?;
    match tensors.as_slice() {
        [(_, t)] => grid_of(t),
        named => named
            .iter()
            .find(|(n, _)| n.as_deref() == Some(GRID_KEY))
            .map(|(_, g)| grid_of(g))
            .unwrap_or_else(|| Err(invalid(format!("the {GRID_KEY} blob must hold one tensor")))),
    }
}

/// Check `(tokens, hidden)` against the model and build the tensor in the
/// model's dtype. (The family's processor checks the rows against the grid.)
pub fn embeddings_tensor(
    what: &str,
    data: Vec<f32>,
    shape: &[usize],
    hidden: usize,
    dtype: DType,
) -> Result<Tensor, MediaError> {
    let [rows, cols] = match *shape {
        [r, c] => [r, c],
        [1, r, c] => [r, c],
        _ => {
            return Err(invalid(format!(
                "{what} must have shape (feature_tokens, hidden) = (n, {hidden}), got {shape:?}"
            )))
        }
    };
    if rows.checked_mul(cols) != Some(data.len()) {
        return Err(invalid(format!(
            "{what} holds {} values but its shape {shape:?} needs {}",
            data.len(),
            rows.saturating_mul(cols)
        )));
    }
    if cols != hidden {
        return Err(invalid(format!(
            "{what} has hidden size {cols} but the model's hidden size is {hidden} (expected shape ({rows}, {hidden}))"
        )));
    }
    if data.iter().any(|v| !v.is_finite()) {
        return Err(invalid(format!("{what} holds NaN or infinite values")));
    }
    Tensor::from_vec(data, (rows, cols), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .map_err(|e| invalid(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()] }),
            );
            data.extend_from_slice(bytes);
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        out
    }

    #[test]
    fn reads_f16_embeds_and_an_int_grid() {
        let e: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let g: Vec<u8> = [1i64, 2, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = parse_embeds(
            &blob(&[
                ("image_embeds", "F16", vec![1, 4], e),
                ("image_grid_thw", "I64", vec![1, 3], g),
            ]),
            Modality::Image,
        )
        .unwrap();
        assert_eq!(p.data, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(p.grid_thw, Some([1, 2, 2]));
        let t = embeddings_tensor("image_embeds", p.data, &p.shape, 4, DType::F32).unwrap();
        assert_eq!(t.dims(), [1, 4]);
    }

    #[test]
    fn mismatches_name_expected_and_got() {
        let e = parse_embeds(
            &blob(&[("image_embeds", "I32", vec![1], vec![0; 4])]),
            Modality::Image,
        )
        .err()
        .unwrap();
        assert!(e.message().contains("float tensor"), "{}", e.message());
        let e = embeddings_tensor("image_embeds", vec![0.0; 8], &[1, 8], 4, DType::F32)
            .err()
            .unwrap();
        assert!(
            e.message().contains("hidden size 8") && e.message().contains("is 4"),
            "{}",
            e.message()
        );
        let e = embeddings_tensor("image_embeds", vec![0.0; 6], &[2, 4], 4, DType::F32)
            .err()
            .unwrap();
        assert!(e.message().contains("holds 6 values"), "{}", e.message());
        assert!(parse_embeds(b"nonsense", Modality::Image).is_err());
    }

    /// A valid blob (f32 embeds + an i64 grid), a fuzz seed.
    fn seed() -> Vec<u8> {
        let e: Vec<u8> = (0..8).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let g: Vec<u8> = [1i64, 2, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        blob(&[
            ("image_embeds", "F32", vec![2, 4], e),
            ("image_grid_thw", "I64", vec![1, 3], g),
        ])
    }

    /// Any outcome is embeds that fill their shape, or a 400.
    fn check(bytes: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
        match parse_embeds(bytes, Modality::Image) {
            Ok(p) => proptest::prop_assert_eq!(p.data.len(), p.shape.iter().product::<usize>()),
            Err(e) => proptest::prop_assert_eq!(e.http_status(), 400),
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 256, ..Default::default() })]

        #[test]
        fn random_bytes_are_a_400_never_a_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            check(&bytes)?;
        }

        #[test]
        fn mutated_blobs_are_embeds_or_a_400(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(proptest::prelude::any::<usize>()),
        ) {
            let mut bytes = seed();
            assert!(parse_embeds(&bytes, Modality::Image).is_ok());
            let n = bytes.len();
            for (at, v) in edits {
                bytes[at % n] ^= v | 1;
            }
            if let Some(c) = cut {
                bytes.truncate(c % n);
            }
            check(&bytes)?;
        }
    }
}
