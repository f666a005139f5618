//! A counting memory budget shared by worker threads, so that decoding many very
//! large images in parallel cannot multiply peak memory by the thread count.

use std::sync::{Condvar, Mutex};

pub struct Budget {
    capacity: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Held while a job uses its share of the budget; released on drop.
pub struct Permit<'a> {
    budget: &'a Budget,
    amount: u64,
}

impl Budget {
    pub fn new(capacity: u64) -> Self {
        Budget {
            capacity: capacity.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Blocks until `amount` bytes fit. A job larger than the whole budget waits until
    /// nothing else runs, then runs alone.
    pub fn acquire(&self, amount: u64) -> Permit<'_> {
        let amount = amount.min(self.capacity);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used + amount > self.capacity {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += amount;
        Permit {
            budget: self,
            amount,
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.amount;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn never_exceeds_capacity() {
        let b = Budget::new(100);
        let live = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let (b, live, peak) = (&b, &live, &peak);
                s.spawn(move || {
                    let amt = 30 + i * 10;
                    let _p = b.acquire(amt);
                    let now = live.fetch_add(amt.min(100), Ordering::SeqCst) + amt.min(100);
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    live.fetch_sub(amt.min(100), Ordering::SeqCst);
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 100);
    }
}
