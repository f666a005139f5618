/// jemalloc keeps freed large blocks for reuse: with the system allocator every activation
/// above glibc's 32 MB mmap limit was a fresh mapping, and zeroing its pages on first touch
/// took ~9% of a UNet forward+backward (perf, bench/unet).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options: return freed pages at once. Never returning them (`-1`) made one UNet
/// forward+backward faster (62.0 s against 70.6 s with the default 10 s decay, bench/unet),
/// but in training the retained pages fragment: an SD1.5 LoRA step's RSS grew 10.9 -> 13.7 ->
/// 15.9 GB over three steps (live memory stayed at 4.5-10.7 GB) and steps took 76.7 s; with
/// immediate return the peak is 10.7 GB every step and a step 66.3 s (bench/train, same
/// machine and run).
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 34] = b"dirty_decay_ms:0,muzzy_decay_ms:0\0";

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
