//! mergen-bench: one binary, one subcommand per benchmark family. Every figure is
//! reported as a ratio against a baseline measured in the same run, because this
//! machine is shared and noisy.

#![deny(unsafe_code)]

mod certs;
mod ctl;
mod forwarder;
mod interrupt;
mod netns;
mod procfs;
mod spawn;
mod tlsclient;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("help", &[][..]),
    };
    let result = match cmd {
        "netns" => netns::run(rest),
        "ctl" => ctl::run(rest),
        "forwarder" => forwarder::run(rest),
        _ => {
            eprintln!("usage: mergen-bench <netns|ctl|forwarder> [options]");
            return if cmd == "help" || cmd == "--help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mergen-bench {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}
