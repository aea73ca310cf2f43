//! `mm_hash`: the cache identity of one media item.
//!
//! A caller-given uuid replaces content hashing (vLLM semantics); otherwise the
//! hash covers the modality, the raw bytes and the processor kwargs, so the same
//! image preprocessed differently gets a different key.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modality {
    Image,
    Video,
    Audio,
}

impl Modality {
    /// `image`, `video` or `audio`, as the APIs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Video => "video",
            Modality::Audio => "audio",
        }
    }

    /// The modality named `name` (see [`Self::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Modality::Image, Modality::Video, Modality::Audio]
            .into_iter()
            .find(|m| m.name() == name)
    }

    fn tag(self) -> &'static [u8] {
        match self {
            Modality::Image => b"image",
            Modality::Video => b"video",
            Modality::Audio => b"audio",
        }
    }
}

/// 32-byte identity of a media item, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmHash(pub [u8; 32]);

impl fmt::Display for MmHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MmHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmHash({self})")
    }
}

/// Hash a media item. `processor_kwargs` must be a canonical string (e.g. JSON
/// with sorted keys); `uuid`, when given, is the identity and the bytes are ignored.
pub fn mm_hash(
    modality: Modality,
    uuid: Option<&str>,
    bytes: &[u8],
    processor_kwargs: &str,
) -> MmHash {
    let mut h = blake3::Hasher::new();
    h.update(modality.tag());
    h.update(&[0]);
    match uuid {
        Some(id) => {
            h.update(b"uuid\0");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"bytes\0");
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
    }
    h.update(&[0]);
    h.update(processor_kwargs.as_bytes());
    MmHash(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_modality_and_kwargs_all_change_the_hash() {
        let a = mm_hash(Modality::Image, None, b"png-bytes", "{}");
        assert_eq!(a, mm_hash(Modality::Image, None, b"png-bytes", "{}"));
        assert_ne!(a, mm_hash(Modality::Image, None, b"png-bytez", "{}"));
        assert_ne!(a, mm_hash(Modality::Video, None, b"png-bytes", "{}"));
        assert_ne!(
            a,
            mm_hash(
                Modality::Image,
                None,
                b"png-bytes",
                r#"{"max_pixels":1024}"#
            )
        );
    }

    #[test]
    fn uuid_replaces_content() {
        let a = mm_hash(Modality::Image, Some("cat-1"), b"one", "{}");
        assert_eq!(a, mm_hash(Modality::Image, Some("cat-1"), b"two", "{}"));
        assert_ne!(a, mm_hash(Modality::Image, None, b"one", "{}"));
        assert_eq!(a.to_string().len(), 64);
    }
}
