//! The `tollgate` binary: parses the command line and runs it; errors print one line and exit 1.
#![forbid(unsafe_code)]

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tollgate::logging::init_logging();
    let cli = tollgate::cli::Cli::parse();
    let result = tollgate::cli::run(cli);
    tollgate::logging::flush_logs();
    if let Err(e) = result {
        eprintln!("tollgate: {e:#}");
        std::process::exit(1);
    }
}
