//! A map that forgets: entries go after a time window, and the oldest go
//! first beyond a count. What a process remembers of recent requests or
//! jobs (the ingress's idempotency keys, the relay's delivered ids).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Recently<K, V> {
    window: Duration,
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

#[derive(Debug)]
struct Inner<K, V> {
    entries: HashMap<K, (Instant, V)>,
    /// Insertions, oldest first; an entry refreshed since has a later one.
    order: VecDeque<(K, Instant)>,
}

impl<K: Eq + Hash + Clone, V> Recently<K, V> {
    /// Remembers each entry for `window` (zero: not at all), and at most
    /// `capacity` entries.
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { window, capacity, inner: Mutex::new(Inner { entries: HashMap::new(), order: VecDeque::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        // A panic while holding this lock leaves consistent data behind.
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        while inner.order.front().is_some_and(|(_, at)| now.duration_since(*at) >= self.window) {
            inner.forget_oldest();
        }
        inner
    }

    pub fn get(&self, key: &K) -> Option<V>
    where
        V: Clone,
    {
        self.with(key, V::clone)
    }

    /// What `f` makes of `key`'s value, if it is there, under the lock.
    pub fn with<T>(&self, key: &K, f: impl FnOnce(&V) -> T) -> Option<T> {
        self.lock().entries.get(key).map(|(_, value)| f(value))
    }

    /// Inserts or refreshes `key`.
    pub fn insert(&self, key: K, value: V) {
        let mut inner = self.lock();
        inner.put(key, value, self.window, self.capacity);
    }

    /// Inserts `key` unless it is there; true if it was not.
    pub fn insert_new(&self, key: K, value: V) -> bool {
        let mut inner = self.lock();
        if inner.entries.contains_key(&key) {
            return false;
        }
        inner.put(key, value, self.window, self.capacity);
        true
    }

    /// Inserts or refreshes `key` with what `f` makes of its value, if any,
    /// under one lock.
    pub fn update(&self, key: K, f: impl FnOnce(Option<V>) -> V) {
        let mut inner = self.lock();
        // Its insertion left in `order` is stale now, and skipped.
        let value = f(inner.entries.remove(&key).map(|(_, value)| value));
        inner.put(key, value, self.window, self.capacity);
    }

    pub fn remove(&self, key: &K) {
        self.lock().entries.remove(key);
    }
}

impl<K: Eq + Hash + Clone, V> Inner<K, V> {
    fn put(&mut self, key: K, value: V, window: Duration, capacity: usize) {
        if window.is_zero() {
            return;
        }
        let now = Instant::now();
        self.entries.insert(key.clone(), (now, value));
        self.order.push_back((key, now));
        // Refreshes leave stale insertions behind in `order`; bound both.
        while self.entries.len() > capacity || self.order.len() > 2 * capacity {
            self.forget_oldest();
        }
    }

    /// Drops the oldest insertion, unless its key was refreshed since.
    fn forget_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && let Entry::Occupied(entry) = self.entries.entry(key)
            && entry.get().0 == at
        {
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_after_the_window() {
        let recently = Recently::new(Duration::from_millis(50), 10);
        assert!(recently.insert_new("a", 1));
        assert!(!recently.insert_new("a", 2), "still there");
        assert_eq!(recently.get(&"a"), Some(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while recently.get(&"a").is_some() {
            assert!(Instant::now() < deadline, "forgotten after the window");
            std::thread::yield_now();
        }
        let never = Recently::new(Duration::ZERO, 10);
        never.insert("a", 1);
        assert_eq!(never.get(&"a"), None, "a zero window remembers nothing");
    }

    #[test]
    fn forgets_the_oldest_beyond_the_capacity_but_not_a_refreshed_one() {
        let recently = Recently::new(Duration::from_secs(3600), 3);
        for key in ["a", "b", "c"] {
            recently.insert(key, ());
        }
        recently.insert("a", ());
        recently.insert("d", ());
        assert_eq!(recently.get(&"b"), None, "the oldest went");
        assert_eq!(recently.get(&"a"), Some(()), "refreshed, so younger than b");
        assert_eq!(recently.get(&"c"), Some(()));
        recently.remove(&"a");
        assert_eq!(recently.get(&"a"), None);
    }

    #[test]
    fn updates_see_the_value_in_place() {
        let counts = Recently::new(Duration::from_secs(3600), 3);
        counts.update("a", |old: Option<u32>| old.map_or(1, |n| n + 1));
        counts.update("a", |old| old.map_or(1, |n| n + 1));
        assert_eq!(counts.get(&"a"), Some(2));
    }
}
