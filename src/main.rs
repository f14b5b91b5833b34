//! The `kvsift` command line. See `kvsift --help`.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`kvsift info | head -1`): nothing left to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr().lock(), "error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: library errors already name
/// their source in their own message (`path: No such file ...`), so a cause
/// whose text the message already holds is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    // The subcommands name the file of every other I/O error; a bare one is
    // their output failing (`> /dev/full`).
    if e.downcast_ref::<std::io::Error>().is_some() {
        msg = format!("writing the output: {msg}");
    }
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
