/// jemalloc keeps freed large blocks for reuse: with the system allocator every activation
/// above glibc's 32 MB mmap limit was a fresh mapping, and zeroing its pages on first touch
/// took ~9% of a UNet forward+backward (perf, bench/unet).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options: keep freed pages for reuse, back the heap with transparent huge pages,
/// and let any free block be split for a smaller request (`lg_extent_max_active_fit:16`;
/// jemalloc's default refuses blocks over 64x the request and maps fresh memory instead).
/// Returning pages at once (`dirty_decay_ms:0`) cost ~4M page faults per UNet
/// forward+backward, a third of the run in the kernel; keeping them with 4 KB pages still
/// faulted 7M times on first touch, with huge pages 6.6k. With the default fit limit the
/// kept pages fragmented (resident set +1.2 GB every LoRA step), and handing them back at
/// each step end made every step refault its working set; with the limit lifted the resident
/// set is flat at one step's working set. SD1.5 LoRA step (bench/train, 2-core AVX2 EPYC,
/// one session): 25.8 s/step releasing per step, 18.7 s with this setting, peak 7.9 vs
/// 8.1 GB (BENCHMARKS.md, speed). The trainer's `util::alloc::GrowthGuard` still releases
/// should the resident set grow.
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 75] = sdkit::util::alloc::JEMALLOC_CONF;

fn main() {
    // A closed stdout (`sdkit ... --json | head`) ends the process quietly, as for other
    // Unix tools, instead of a panic in `println!`.
    #[cfg(unix)]
    // SAFETY: called first in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let code = match sdkit::cli::parse().and_then(sdkit::cli::run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
