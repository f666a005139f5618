//! The process allocator's cached pages.
//!
//! The `sdkit` binary runs on jemalloc set never to return freed pages on its own, with
//! transparent huge pages and no limit on carving a small block out of a large free one
//! (src/main.rs): a training step frees and reallocates gigabytes of activations, and pages
//! given back to the kernel fault (and are zeroed, on a VM often by the host) again on
//! reuse. With those settings the cache holds one step's working set and the resident set
//! stays flat from the second step on (BENCHMARKS.md, speed). [`GrowthGuard`] is the
//! backstop: should the resident set still grow (a workload that fragments the heap), it
//! hands the cache back.

/// jemalloc's options for the `sdkit` binary and the benchmarks that time it (src/main.rs
/// explains each): never return freed pages on a timer, transparent huge pages, and no limit
/// on splitting a large free block for a smaller request.
pub const JEMALLOC_CONF: &[u8; 75] =
    b"dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always,lg_extent_max_active_fit:16\0";

/// Returns every cached free page of jemalloc's arenas to the kernel. The next step then
/// refaults its working set (2 MB huge pages), which on the benchmark VM cost ~6 s of a
/// ~19 s LoRA step. A no-op where jemalloc is not linked in (MSVC) and harmless where it is
/// not the global allocator (its arenas then hold nothing).
pub fn release_free_pages() {
    #[cfg(not(target_env = "msvc"))]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge": purge all arenas; takes no arguments.
        let name = c"arena.4096.purge";
        // SAFETY: a documented void mallctl; NULL old/new pointers with zero length are its
        // calling convention. The return code only reports an unknown name or arena.
        let _ = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
    }
}

/// The process's resident set in bytes, where the OS tells it cheaply (Linux).
pub fn resident_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(page).ok().map(|p| pages * p)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Watches the resident set at each optimizer step's end (when only weights, optimizer
/// state and cached data are live) and hands the allocator's cache back once it has grown
/// by more than [`GrowthGuard::SLACK`] over the first step's figure; the next step's figure
/// is then the new reference. Steady training never releases; a larger bucket later in an
/// epoch releases once and re-bases.
#[derive(Debug, Default)]
pub struct GrowthGuard {
    reference: Option<u64>,
}

impl GrowthGuard {
    /// Growth over the reference that triggers a release: a quarter.
    pub const SLACK: f64 = 0.25;

    pub fn new() -> Self {
        Self::default()
    }

    /// Records the resident set `rss` and says whether the cache should be released now.
    pub fn observe(&mut self, rss: u64) -> bool {
        match self.reference {
            None => {
                self.reference = Some(rss);
                false
            }
            Some(r) if rss as f64 > r as f64 * (1.0 + Self::SLACK) => {
                self.reference = None;
                true
            }
            Some(_) => false,
        }
    }

    /// At a step end: reads the resident set and releases the cache when it has grown too
    /// much. Returns whether it released. Where the resident set is unknown it never does.
    pub fn step_end(&mut self) -> bool {
        let release = resident_bytes().is_some_and(|rss| self.observe(rss));
        if release {
            release_free_pages();
        }
        release
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    #[test]
    fn steady_training_never_releases() {
        let mut g = GrowthGuard::new();
        for rss in [8 * GB, 8 * GB + GB / 4, 9 * GB, 8 * GB, 9 * GB + GB / 2] {
            assert!(!g.observe(rss), "released at {rss}");
        }
    }

    #[test]
    fn growth_past_the_slack_releases_once_and_rebases() {
        let mut g = GrowthGuard::new();
        assert!(!g.observe(8 * GB));
        assert!(!g.observe(9 * GB));
        assert!(g.observe(11 * GB));
        // The step after a release sets the new reference.
        assert!(!g.observe(12 * GB));
        assert!(!g.observe(14 * GB));
        assert!(g.observe(16 * GB));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_set_is_read_on_linux() {
        // At least the test binary's code and this thread's stack are resident.
        assert!(resident_bytes().expect("/proc/self/statm") > 1 << 20);
    }
}
