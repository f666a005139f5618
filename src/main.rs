use clap::Parser;

fn main() {
    let cli = sdkit::cli::Cli::parse();
    match sdkit::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
