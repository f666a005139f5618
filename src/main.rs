/// jemalloc keeps freed large blocks for reuse: with the system allocator every activation
/// above glibc's 32 MB mmap limit was a fresh mapping, and zeroing its pages on first touch
/// took ~9% of a UNet forward+backward (perf, bench/unet).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options: keep freed pages for reuse and back the heap with transparent huge
/// pages; the trainer hands the cached pages back at each optimizer step's end
/// (`util::alloc::release_free_pages`). Returning pages at once (`dirty_decay_ms:0`) cost
/// ~4M page faults per UNet forward+backward, a third of the run in the kernel; keeping them
/// with 4 KB pages still faulted 7M times on first touch; with huge pages 6.6k. SD1.5 LoRA
/// step (bench/train, 2-core AVX-512 EPYC, same session): 29.1 s/step and 7.24 GB peak
/// returning at once, 19.4 s and 9.45 GB keeping pages, but then the resident set grew
/// 9.4 -> 12.9 GB over six steps (fragmentation); with the release at each step end it stays
/// flat (BENCHMARKS.md, train).
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 47] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always\0";

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
