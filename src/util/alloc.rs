//! The process allocator's cached pages.
//!
//! The `sdkit` binary runs on jemalloc set never to return freed pages on its own, with
//! transparent huge pages (src/main.rs): a training step frees and reallocates gigabytes of
//! activations, and pages given back to the kernel fault (and are zeroed) again on reuse.
//! Kept forever, though, the cached pages fragment and the resident set grows step after
//! step, so the trainer hands the cache back at each optimizer step's end, when only the
//! weights, optimizer state and cached latents are live.

/// Returns every cached free page of jemalloc's arenas to the kernel. Costs little: the next
/// step refaults its working set in 2 MB huge pages. A no-op where jemalloc is not linked in
/// (MSVC) and harmless where it is not the global allocator (its arenas then hold nothing).
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
