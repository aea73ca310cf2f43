//! Memory for decoded media, reserved before the pixel or sample buffers
//! exist: a small file can declare gigabytes of pixels (a 1.3 MB PNG of
//! 13000 x 13000 x 16-bit RGBA decodes to 1.35 GB).
//!
//! Two limits: one item may take at most `per_item` bytes (more is a 413),
//! and all items being decoded or held at once at most `total` (an item that
//! does not fit waits, in a bounded queue for a bounded time, then gets a
//! 503). Both messages carry the numbers.
//!
//! The process shares one budget ([`MediaBudget::global`]), sized from the
//! machine's memory unless `CANDELA_MEDIA_MEMORY_BUDGET` gives it in bytes.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::MediaError;

/// The env var that sets the process's budget in bytes (`candela serve --media-memory-budget`).
pub const BUDGET_ENV: &str = "CANDELA_MEDIA_MEMORY_BUDGET";

/// Shared decoded-media budget; clones are handles on the same budget.
#[derive(Debug, Clone)]
pub struct MediaBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    total: u64,
    per_item: u64,
    max_waiters: usize,
    max_wait: Duration,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_use: u64,
    waiting: usize,
}

/// Bytes held from a [`MediaBudget`]; dropping it gives them back.
#[derive(Debug)]
pub struct Reservation {
    inner: Arc<Inner>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut s = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_use -= self.bytes;
        self.inner.freed.notify_all();
    }
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Move `bytes` of this reservation (at most all of it) into a new one,
    /// e.g. one video frame's share of the reservation made for all of them.
    pub fn split_off(&mut self, bytes: u64) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            inner: Arc::clone(&self.inner),
            bytes,
        }
    }

    /// Hold `more` bytes too, for an item whose size shows while it decodes
    /// (audio): the per-item limit applies to the total.
    pub fn grow(&mut self, more: u64, what: &str) -> Result<(), MediaError> {
        self.inner.take(more, self.bytes + more, what)?;
        self.bytes += more;
        Ok(())
    }

    /// Give back all but `bytes` (a decoder's buffers are gone, its output stays).
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            let mut s = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            s.in_use -= self.bytes - bytes;
            self.bytes = bytes;
            self.inner.freed.notify_all();
        }
    }
}

impl PartialEq for MediaBudget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for MediaBudget {}

/// Default share of the machine's memory for decoded media.
const MACHINE_SHARE: u64 = 4;
/// The default budget stays within these bounds whatever the machine.
const MIN_DEFAULT: u64 = 512 << 20;
const MAX_DEFAULT: u64 = 16 << 30;

impl MediaBudget {
    /// A budget of `total` bytes in flight, at most `per_item` for one item;
    /// an item that does not fit waits at most `max_wait`, behind at most
    /// `max_waiters` others.
    pub fn new(total: u64, per_item: u64, max_waiters: usize, max_wait: Duration) -> Self {
        MediaBudget {
            inner: Arc::new(Inner {
                total,
                per_item: per_item.min(total),
                max_waiters,
                max_wait,
                state: Mutex::new(State::default()),
                freed: Condvar::new(),
            }),
        }
    }

    /// The budget for `total` bytes with the server's defaults: one item may
    /// take half of it, 64 items may wait, each for up to 30 s.
    pub fn with_total(total: u64) -> Self {
        MediaBudget::new(total, total / 2, 64, Duration::from_secs(30))
    }

    /// The process's budget: `CANDELA_MEDIA_MEMORY_BUDGET` bytes when set,
    /// else a quarter of the machine's memory within 512 MiB..16 GiB. Read
    /// once, at the first decode.
    pub fn global() -> &'static MediaBudget {
        static GLOBAL: OnceLock<MediaBudget> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let from_env = std::env::var(BUDGET_ENV)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            MediaBudget::with_total(from_env.filter(|&b| b > 0).unwrap_or_else(default_total))
        })
    }

    /// Largest reservation one item may make.
    pub fn per_item(&self) -> u64 {
        self.inner.per_item
    }

    /// The budget for everything in flight.
    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> u64 {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .in_use
    }

    /// Reserve `bytes` for `what` (e.g. "the 13000x13000 PNG image"), waiting
    /// for room if the budget is busy.
    pub fn reserve(&self, bytes: u64, what: &str) -> Result<Reservation, MediaError> {
        self.inner.take(bytes, bytes, what)?;
        Ok(Reservation {
            inner: Arc::clone(&self.inner),
            bytes,
        })
    }
}

impl Inner {
    /// Add `bytes` to what is in use for an item that will then hold `item`
    /// bytes in all, waiting for room.
    fn take(&self, bytes: u64, item: u64, what: &str) -> Result<(), MediaError> {
        let i = self;
        if item > i.per_item {
            return Err(MediaError::TooLarge(format!(
                "{what} needs {} to decode, above the per-item media memory limit of {} \
                 (half of --media-memory-budget); send it smaller",
                mib(item),
                mib(i.per_item)
            )));
        }
        let mut s = i.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.in_use + bytes > i.total {
            if s.waiting >= i.max_waiters {
                return Err(busy(what, bytes, s.in_use, i.total));
            }
            s.waiting += 1;
            let end = Instant::now() + i.max_wait;
            while s.in_use + bytes > i.total {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    s.waiting -= 1;
                    return Err(busy(what, bytes, s.in_use, i.total));
                }
                s = i
                    .freed
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            s.waiting -= 1;
        }
        s.in_use += bytes;
        Ok(())
    }
}

fn busy(what: &str, bytes: u64, in_use: u64, total: u64) -> MediaError {
    MediaError::Busy(format!(
        "{what} needs {} to decode and {} of the {} media memory budget are in use; try again shortly",
        mib(bytes),
        mib(in_use),
        mib(total)
    ))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// A quarter of MemTotal (Linux), within 512 MiB..16 GiB; 2 GiB where the
/// machine does not say.
fn default_total() -> u64 {
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    mem.map_or(2 << 30, |m| {
        (m / MACHINE_SHARE).clamp(MIN_DEFAULT, MAX_DEFAULT)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_item_limit_is_a_413_with_the_numbers() {
        let b = MediaBudget::new(1 << 30, 100 << 20, 4, Duration::from_millis(10));
        let e = b.reserve(200 << 20, "the 9000x9000 PNG image").unwrap_err();
        assert_eq!(e.http_status(), 413);
        assert_eq!(
            e.message(),
            "the 9000x9000 PNG image needs 200.0 MiB to decode, above the per-item media memory limit \
             of 100.0 MiB (half of --media-memory-budget); send it smaller"
        );
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn reservations_are_given_back_and_a_full_budget_waits_then_503s() {
        let b = MediaBudget::new(100, 100, 1, Duration::from_millis(50));
        let r1 = b.reserve(60, "a").unwrap();
        assert_eq!(b.in_use(), 60);
        let e = b.reserve(50, "b").unwrap_err();
        assert_eq!(e.http_status(), 503);
        assert!(
            e.message()
                .contains("0.0 MiB of the 0.0 MiB media memory budget are in use"),
            "{e}"
        );
        let mut r1 = r1;
        r1.shrink_to(10);
        assert_eq!((r1.bytes(), b.in_use()), (10, 10));
        let part = r1.split_off(4);
        assert_eq!((r1.bytes(), part.bytes(), b.in_use()), (6, 4, 10));
        drop(part);
        assert_eq!(b.in_use(), 6);
        drop(r1);
        assert_eq!(b.in_use(), 0);
        let _r2 = b.reserve(50, "b").unwrap();
        assert_eq!(b.in_use(), 50);
    }

    #[test]
    fn a_waiter_gets_the_bytes_another_thread_frees() {
        let b = MediaBudget::new(100, 100, 4, Duration::from_secs(30));
        let held = b.reserve(80, "a").unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.reserve(50, "b").map(|r| r.bytes()));
        // The waiter cannot have its bytes before these are freed.
        while b.inner.state.lock().unwrap().waiting == 0 {
            std::thread::yield_now();
        }
        assert_eq!(b.in_use(), 80);
        drop(held);
        assert_eq!(t.join().unwrap().unwrap(), 50);
    }

    #[test]
    fn a_growing_reservation_is_held_to_the_item_limit_in_total() {
        let b = MediaBudget::new(1000, 100, 4, Duration::from_millis(10));
        let mut r = b.reserve(60, "a").unwrap();
        r.grow(40, "a").unwrap();
        assert_eq!((r.bytes(), b.in_use()), (100, 100));
        assert_eq!(r.grow(1, "the audio").unwrap_err().http_status(), 413);
        assert_eq!(b.in_use(), 100);
        drop(r);
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn the_queue_is_bounded() {
        let b = MediaBudget::new(10, 10, 0, Duration::from_secs(30));
        let _held = b.reserve(10, "a").unwrap();
        // No room to wait: refused at once rather than after 30 s.
        assert_eq!(b.reserve(1, "b").unwrap_err().http_status(), 503);
    }
}
