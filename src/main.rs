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
