//! Loading a checkpoint sharded the way `save_pretrained` shards big models
//! (several safetensors files + model.safetensors.index.json) gives the same
//! model as the single file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candela_core::model::{ForwardBatch, SeqSlice};
use candela_models::{load, LoadOptions};
use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// Last-token logits of one prefill of `ids`.
fn last_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let mut loaded = load(dir, &LoadOptions::default()).expect("load");
    let bs = 16;
    let blocks = ids.len().div_ceil(bs) as u32;
    loaded.model.allocate_kv_cache(blocks as usize, bs).unwrap();
    let batch = ForwardBatch {
        input_ids: ids.to_vec(),
        positions: (0..ids.len() as u32).collect(),
        slot_mapping: (0..ids.len() as u32).collect(),
        seqs: vec![SeqSlice {
            query_start: 0,
            query_len: ids.len(),
            context_len: ids.len(),
            block_table: (0..blocks).collect(),
            needs_logits: true,
        }],
        block_size: bs,
        mm_embeds: Vec::new(),
        mrope_positions: None,
    };
    loaded
        .model
        .forward(&batch)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_safetensors_with_an_index_load_like_one_file() {
    let src = fixture("llama-tiny");
    let dir = std::env::temp_dir().join(format!("candela-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let s = i % 2;
        shards[s].insert((*name).clone(), tensors[*name].clone());
        weight_map.insert(
            (*name).clone(),
            format!("model-0000{}-of-00002.safetensors", s + 1).into(),
        );
    }
    for (s, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            shard,
            dir.join(format!("model-0000{}-of-00002.safetensors", s + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let ids = [504u32, 3575, 282, 4649, 314];
    let (a, b) = (last_logits(&src, &ids), last_logits(&dir, &ids));
    assert_eq!(a.len(), b.len());
    assert_eq!(a, b, "sharded and single-file checkpoints disagree");

    // A shard named in the index but missing is a clear error, not a panic.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load(&dir, &LoadOptions::default())
        .expect_err("missing shard must fail")
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn min_tokens_never_exceeds_the_real_count() {
    // Byte-level BPE (qwen2, llama 3), SentencePiece with byte fallback
    // (llama-tiny) and a GGUF-built tokenizer, on ASCII, CJK, emoji, NFKC
    // ligatures and long runs that merge into few tokens.
    let texts = [
        "The quick brown fox jumps over the lazy dog. ".repeat(50),
        "東京は日本の首都です。".repeat(40),
        "🙂🚀👩‍👩‍👧 ".repeat(40),
        "ﬁﬂﬃ ㍿ ".repeat(60),
        "=".repeat(4000),
        " ".repeat(4000),
        "a".repeat(4000),
    ];
    for name in ["qwen2-tiny", "llama3-tiny", "llama-tiny", "llama-tiny.gguf"] {
        let loaded = load(&fixture(name), &LoadOptions::default()).unwrap();
        let tok = &loaded.tokenizer;
        assert!(tok.max_token_bytes() >= 1, "{name}");
        for t in &texts {
            let n = tok.encode(t, false).unwrap().len();
            let least = tok.min_tokens(t.len());
            assert!(
                least <= n,
                "{name}: {least} > {n} tokens for {:?}",
                t.chars().take(10).collect::<String>()
            );
        }
        // A 10 MB prompt is known to overflow an 8k context before tokenizing.
        assert!(
            tok.min_tokens(10 << 20) > 8192,
            "{name}: {}",
            tok.min_tokens(10 << 20)
        );
    }
}

/// A GGUF file of `tensors` (name, dims, ggml type id), zeroed data.
fn gguf_bytes(tensors: &[(&str, [u64; 2], u32)]) -> Vec<u8> {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(1u64.to_le_bytes());
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    string(&mut b, "llama");
    for (name, dims, ty) in tensors {
        string(&mut b, name);
        b.extend(2u32.to_le_bytes());
        dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    }
    b.resize(b.len().next_multiple_of(32) + 4096, 0);
    b
}

#[test]
fn a_gguf_of_an_unread_type_is_named_in_the_error() {
    let dir = std::env::temp_dir().join(format!("candela-iq4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model-IQ4_XS.gguf");
    let refusal = |path: &Path| match load(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    for (ty, name) in [
        (17, "IQ2_XS (type 17)"),
        (21, "IQ3_S (type 21)"),
        (99, "type 99"),
    ] {
        std::fs::write(&path, gguf_bytes(&[("blk.0.attn_q.weight", [256, 8], ty)])).unwrap();
        let err = refusal(&path);
        assert!(err.contains(name), "{err}");
        assert!(err.contains("Q4_K_M"), "{err}");
    }
    // A type candle reads (Q4_K), and the IQ4 types (`gguf_types`), get past
    // the header (and fail later, on the missing tensors).
    for ty in [12, 20, 23] {
        std::fs::write(&path, gguf_bytes(&[("blk.0.attn_q.weight", [256, 8], ty)])).unwrap();
        let err = refusal(&path);
        assert!(!err.contains("does not read"), "{ty}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// IQ4 tensors whose header does not fit their data are refused by name
/// when read, as the types candle reads are: rows that are not whole
/// blocks, and data past the end of the file.
#[test]
fn iq4_tensors_that_do_not_fit_are_errors() {
    use candela_models::weights::GgufWeights;
    let dir = std::env::temp_dir().join(format!("candela-iq4-fit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    for (dims, ty, want) in [
        ([32, 8], 23, "not whole blocks"),
        ([256, 1 << 20], 23, "past the end of the file"),
        ([32, 1 << 20], 20, "past the end of the file"),
    ] {
        std::fs::write(&path, gguf_bytes(&[("blk.0.attn_q.weight", dims, ty)])).unwrap();
        let g = GgufWeights::open(&path, DType::F32, &Device::Cpu).expect("the header reads");
        let err = g
            .qtensor_raw("blk.0.attn_q.weight")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(want) && err.contains("IQ4_"),
            "{dims:?} {ty}: {err}"
        );
        let k = dims[0] as usize;
        let rows = dims[1] as usize;
        let err = g
            .read_matrix(&[("blk.0.attn_q.weight", rows)], k)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{dims:?} {ty}: {err}");
    }
    // Whole blocks within the file: zero data reads as zeros.
    std::fs::write(&path, gguf_bytes(&[("blk.0.attn_q.weight", [256, 8], 23)])).unwrap();
    let g = GgufWeights::open(&path, DType::F32, &Device::Cpu).unwrap();
    let t = g.qtensor_raw("blk.0.attn_q.weight").unwrap();
    assert_eq!(t.shape().dims(), [8, 256]);
    let v = t
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|x| *x == 0.0));
    assert!(g
        .read_matrix(&[("blk.0.attn_q.weight", 8)], 256)
        .unwrap()
        .is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}
