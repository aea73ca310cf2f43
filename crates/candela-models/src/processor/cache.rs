//! Processor cache: `mm_hash -> preprocessed item`, bounded in bytes, least
//! recently used out first. A repeated item skips decoding and feature
//! extraction.

use candela_core::lru::WeightedLru;

use super::ProcessedItem;

#[derive(Debug)]
pub struct ProcessorCache(WeightedLru<ProcessedItem>);

impl ProcessorCache {
    /// A cache of at most `capacity_bytes`; 0 disables it.
    pub fn new(capacity_bytes: usize) -> Self {
        Self(WeightedLru::new(capacity_bytes))
    }

    pub fn enabled(&self) -> bool {
        self.0.enabled()
    }

    pub fn get(&mut self, hash: &str) -> Option<ProcessedItem> {
        self.0.get(hash).cloned()
    }

    /// Whether the item is held (no counting, no recency change).
    pub fn contains(&self, hash: &str) -> bool {
        self.0.contains(hash)
    }

    pub fn insert(&mut self, hash: &str, item: ProcessedItem) {
        let bytes = item.features.num_bytes();
        self.0.insert(hash, item, bytes);
    }

    /// `(items, bytes)` held.
    pub fn usage(&self) -> (usize, usize) {
        (self.0.len(), self.0.used())
    }

    /// `(queries, hits)`.
    pub fn counters(&self) -> (u64, u64) {
        self.0.counters()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candela_core::request::MmFeatures;
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::processor::ItemLayout;

    fn item(bytes: usize) -> ProcessedItem {
        let t = Tensor::zeros(bytes / 4, candle_core::DType::F32, &Device::Cpu).unwrap();
        ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![("x".into(), t)],
            }),
            layout: ItemLayout::rows(1),
        }
    }

    #[test]
    fn bounded_in_bytes_lru_first() {
        let mut c = ProcessorCache::new(100);
        c.insert("a", item(40));
        c.insert("b", item(40));
        assert!(c.get("a").is_some());
        c.insert("c", item(40));
        assert!(c.get("b").is_none() && c.get("a").is_some() && c.get("c").is_some());
        assert_eq!(c.usage(), (2, 80));
        assert_eq!(c.counters(), (4, 3));
        c.insert("huge", item(400));
        assert_eq!(c.usage(), (2, 80));
    }
}
