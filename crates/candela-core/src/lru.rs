//! The one LRU map behind candela's caches (encoder outputs here, processor
//! outputs and media layouts in candela-models): string keys, a weight per
//! entry (tokens, bytes, or 1), a bound on the total weight, and the least
//! recently used entries out first. Lookups through [`WeightedLru::get`] are
//! counted, for the caches' hit rates.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
struct Entry<V> {
    value: V,
    weight: usize,
    tick: u64,
}

#[derive(Debug)]
pub struct WeightedLru<V> {
    capacity: usize,
    used: usize,
    entries: HashMap<String, Entry<V>>,
    /// Recency order: tick of last use -> key (oldest first).
    order: BTreeMap<u64, String>,
    clock: u64,
    queries: u64,
    hits: u64,
}

impl<V> WeightedLru<V> {
    /// A cache holding at most `capacity` total weight; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            queries: 0,
            hits: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    fn touch(&mut self, key: &str) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(key) {
            self.order.remove(&e.tick);
            e.tick = self.clock;
            self.order.insert(self.clock, key.to_string());
        }
    }

    /// Look up `key`, counting the query and making the entry most recent.
    pub fn get(&mut self, key: &str) -> Option<&V> {
        if !self.enabled() {
            return None;
        }
        self.queries += 1;
        if !self.entries.contains_key(key) {
            return None;
        }
        self.hits += 1;
        self.touch(key);
        self.entries.get(key).map(|e| &e.value)
    }

    /// Look up `key` without counting or changing recency.
    pub fn peek(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Weight of a held entry.
    pub fn weight_of(&self, key: &str) -> Option<usize> {
        self.entries.get(key).map(|e| e.weight)
    }

    /// Keep `value` under `key`, evicting the least recently used entries to
    /// make room. An entry heavier than the whole cache is not kept.
    pub fn insert(&mut self, key: &str, value: V, weight: usize) {
        if !self.enabled() || weight > self.capacity {
            return;
        }
        self.remove(key);
        while self.used + weight > self.capacity {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.used -= e.weight;
            }
        }
        self.clock += 1;
        self.used += weight;
        self.order.insert(self.clock, key.to_string());
        self.entries.insert(
            key.to_string(),
            Entry {
                value,
                weight,
                tick: self.clock,
            },
        );
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.order.remove(&e.tick);
        self.used -= e.weight;
        Some(e.value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total weight held.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `(queries, hits)` counted by [`Self::get`].
    pub fn counters(&self) -> (u64, u64) {
        (self.queries, self.hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_weight() {
        let mut c = WeightedLru::new(10);
        c.insert("a", 1, 4);
        c.insert("b", 2, 4);
        assert_eq!(c.get("a"), Some(&1)); // a is now more recent than b
        c.insert("c", 3, 4); // needs 4 more: b goes
        assert!(c.contains("a") && c.contains("c") && !c.contains("b"));
        assert_eq!(c.used(), 8);
        assert_eq!(c.counters(), (1, 1));
        assert!(c.get("b").is_none());
        assert_eq!(c.counters(), (2, 1));
        // peek neither counts nor refreshes: a stays older than c.
        assert_eq!(c.peek("a"), Some(&1));
        c.insert("d", 4, 4);
        assert!(!c.contains("a") && c.contains("c") && c.contains("d"));
    }

    #[test]
    fn oversized_entries_and_disabled_cache_keep_nothing() {
        let mut c = WeightedLru::new(3);
        c.insert("big", (), 4);
        assert!(c.is_empty());
        let mut off = WeightedLru::new(0);
        off.insert("a", (), 1);
        assert!(off.get("a").is_none());
        assert_eq!(off.counters(), (0, 0));
    }

    #[test]
    fn reinserting_replaces_without_leaking_budget() {
        let mut c = WeightedLru::new(8);
        c.insert("a", 'x', 4);
        c.insert("a", 'y', 6);
        assert_eq!((c.used(), c.len(), c.peek("a")), (6, 1, Some(&'y')));
        assert_eq!(c.remove("a"), Some('y'));
        assert_eq!((c.used(), c.len()), (0, 0));
        // Many entries of weight 1: the order map never outgrows the entries.
        for i in 0..100u32 {
            c.insert(&i.to_string(), char::from_digit(i % 10, 10).unwrap(), 1);
        }
        assert_eq!((c.len(), c.order.len()), (8, 8));
        assert!(c.contains("99") && !c.contains("91"));
    }
}
