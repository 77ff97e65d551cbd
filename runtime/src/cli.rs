//! `mergend vm <step> <id>` and `mergend supervise <id>`: the per-VM host steps, run by
//! a systemd unit or by the embedded supervisor.

use std::process::ExitCode;

/// Entry point for the runtime subcommands; `args` excludes the program name.
pub fn main(args: &[String]) -> ExitCode {
    eprintln!("mergend: runtime subcommands are not built yet: {args:?}");
    ExitCode::from(2)
}
