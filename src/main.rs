/// jemalloc keeps freed large blocks for reuse: with the system allocator every activation
/// above glibc's 32 MB mmap limit was a fresh mapping, and zeroing its pages on first touch
/// took ~9% of a UNet forward+backward (perf, bench/unet).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options: never return freed pages to the OS while running (with the default
/// 10 s decay the big activation blocks were purged and re-faulted between uses: a UNet
/// forward+backward took 70.6 s with it, 62.0 s without, 66.5 s on glibc malloc). RSS
/// stays at the run's peak, as with PyTorch's caching allocator.
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 36] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1\0";

fn main() {
    let code = match sdkit::cli::parse().and_then(sdkit::cli::run) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
