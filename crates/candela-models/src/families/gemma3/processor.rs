//! Gemma 3's image processor (transformers' `Gemma3ImageProcessor`, PIL
//! backend, and `Gemma3Processor`'s prompt expansion): each image resized to
//! the tower's square (Pillow bilinear, aspect ratio not kept), rescaled and
//! normalized; the template's `<start_of_image>` expands to
//! `"\n\n<start_of_image>" + mm_tokens_per_image x <image_soft_token> +
//! "<end_of_image>\n\n"`, only the soft tokens taking the image's rows.
//! Pan-and-scan crops (`do_pan_and_scan`) are not implemented: a config or
//! request that asks for them is refused.

use candela_media::{MediaError, Modality};
use serde_json::Value;

use super::vision::Gemma3VisionConfig;
use crate::families::llava::{ClipImageConfig, ImageProcessor};
use crate::processor::{
    DecodeOptions, ItemLayout, MediaData, MmProcessor, ProcessedItem, Replacement,
};
use crate::Tokenizer;

/// The tokens that stand for a run of `n` newlines (`runs[n - 1]`), as the
/// checkpoint's tokenizer writes them: Gemma 3's vocabulary has one token per
/// run up to 31. transformers tokenizes the expanded prompt text, so the
/// wrapper's "\n\n" merges with a newline run next to it.
#[derive(Debug, Clone)]
struct NewlineRuns(Vec<u32>);

impl NewlineRuns {
    fn of(tokenizer: &Tokenizer) -> Self {
        let mut runs = Vec::new();
        loop {
            match tokenizer.encode(&"\n".repeat(runs.len() + 1), false) {
                Ok(ids) if ids.len() == 1 => runs.push(ids[0]),
                _ => return Self(runs),
            }
        }
    }

    /// How many newlines `token` stands for, if it is a run.
    fn len_of(&self, token: u32) -> Option<usize> {
        self.0.iter().position(|&t| t == token).map(|i| i + 1)
    }

    fn token(&self, n: usize) -> Option<u32> {
        n.checked_sub(1).and_then(|i| self.0.get(i)).copied()
    }
}

/// LLaVA's fixed-square image processor (decode, resize, rescale,
/// normalize; one item = `mm_tokens_per_image` rows, `<start_of_image>` its
/// placeholder) with Gemma's prompt replacement around it.
#[derive(Debug, Clone)]
pub struct Gemma3ImageProcessor {
    image: ImageProcessor,
    eoi: u32,
    soft: u32,
    /// The wrapper's "\n\n" around each image, tokenized.
    blank_line: Vec<u32>,
    newlines: NewlineRuns,
}

impl Gemma3ImageProcessor {
    /// From `preprocessor_config.json`'s text, checked against the model.
    pub fn new(
        preprocessor_config: &str,
        cfg: &Gemma3VisionConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Self, String> {
        let mut json: Value =
            serde_json::from_str(preprocessor_config).map_err(|e| e.to_string())?;
        if json.get("do_pan_and_scan") == Some(&Value::Bool(true)) {
            return Err("do_pan_and_scan (pan-and-scan crops) is not supported".into());
        }
        // Gemma 3's processor has no crop; CLIP's defaults to one.
        if let Some(o) = json.as_object_mut() {
            o.entry("do_center_crop").or_insert(Value::Bool(false));
            o.entry("resample").or_insert(Value::from(2));
        }
        let image_size = cfg.vision.image_size;
        let config = ClipImageConfig::from_preprocessor_config(&json.to_string(), image_size)?;
        Ok(Self {
            image: ImageProcessor {
                config,
                image_size,
                image_token: cfg.boi_token_id,
                tokens_per_image: cfg.mm_tokens_per_image,
            },
            eoi: cfg.eoi_token_id,
            soft: cfg.image_token_id,
            blank_line: tokenizer
                .encode("\n\n", false)
                .map_err(|e| format!("tokenizing the image wrapper: {e}"))?,
            newlines: NewlineRuns::of(tokenizer),
        })
    }
}

impl MmProcessor for Gemma3ImageProcessor {
    fn modalities(&self) -> &[Modality] {
        self.image.modalities()
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        self.image.placeholder_token(modality)
    }

    fn kwargs_key(&self, _modality: Modality, kwargs: &Value) -> Result<String, MediaError> {
        match kwargs {
            Value::Null => Ok("{}".into()),
            Value::Object(o)
                if o.iter().all(|(k, v)| {
                    v.is_null() || (k == "do_pan_and_scan" && v == &Value::Bool(false))
                }) =>
            {
                Ok("{}".into())
            }
            other => Err(MediaError::Invalid(format!(
                "Gemma 3's image processor takes no processor kwargs (pan-and-scan is not \
                 supported), got {other}"
            ))),
        }
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        kwargs: &Value,
        opts: &DecodeOptions,
    ) -> Result<ProcessedItem, MediaError> {
        self.image.process(modality, data, kwargs, opts)
    }

    fn embeddings_layout(
        &self,
        modality: Modality,
        rows: usize,
        grid: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        self.image.embeddings_layout(modality, rows, grid)
    }

    fn replacement(
        &self,
        modality: Modality,
        layout: &ItemLayout,
    ) -> Result<Replacement, MediaError> {
        if modality != Modality::Image {
            return Err(MediaError::Invalid(format!(
                "this model does not accept {} input",
                modality.name()
            )));
        }
        let mut tokens = self.blank_line.clone();
        tokens.push(self.image.image_token);
        let start = tokens.len();
        tokens.extend(std::iter::repeat_n(self.soft, layout.embeds));
        tokens.push(self.eoi);
        tokens.extend(&self.blank_line);
        Ok(Replacement {
            tokens,
            embeds: start..start + layout.embeds,
        })
    }

    fn merge_at_boundary(&self, left: u32, right: u32) -> Option<u32> {
        let n = self.newlines.len_of(left)? + self.newlines.len_of(right)?;
        self.newlines.token(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_runs_merge_as_the_tokenizer_writes_them() {
        let cfg = Gemma3VisionConfig::from_json(&serde_json::json!({
            "vision_config": {"image_size": 896, "patch_size": 14}, "mm_tokens_per_image": 256
        }))
        .unwrap();
        let pp = r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
            "size": {"height": 896, "width": 896}, "do_pan_and_scan": null}"#;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3-tiny");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap();
        let p = Gemma3ImageProcessor::new(pp, &cfg, &tok).unwrap();
        assert_eq!(p.merge_at_boundary(107, 108), Some(109));
        assert_eq!(p.merge_at_boundary(108, 108), Some(110));
        assert_eq!(p.merge_at_boundary(137, 107), None);
        assert_eq!(p.merge_at_boundary(108, 2364), None);
        let r = p
            .replacement(Modality::Image, &ItemLayout::rows(256))
            .unwrap();
        assert_eq!((r.tokens.len(), r.embeds), (260, 2..258));
        assert_eq!(r.tokens[..3], [108, 255999, 262144]);
        assert!(p
            .kwargs_key(
                Modality::Image,
                &serde_json::json!({"do_pan_and_scan": true})
            )
            .is_err());
        let pan = pp.replace("\"do_pan_and_scan\": null", "\"do_pan_and_scan\": true");
        assert!(Gemma3ImageProcessor::new(&pan, &cfg, &tok).is_err());
        let small = pp.replace("896, \"width\": 896", "448, \"width\": 448");
        assert!(Gemma3ImageProcessor::new(&small, &cfg, &tok).is_err());
    }
}
