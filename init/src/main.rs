//! mergen-init: see the crate documentation (`lib.rs`) and README.md.

#![deny(unsafe_code)]

use std::process::ExitCode;

use mergen_init::spec::{ImageMeta, StartSpec};
use mergen_init::system::{self, Mode};
use mergen_init::{exec_as, say, supervise, users};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(exec_as::FLAG) {
        return code(exec_as::run(&args[2..]));
    }
    if matches!(args.get(1).map(String::as_str), Some("-h" | "--help")) {
        print!("{}", include_str!("../README.md"));
        return ExitCode::SUCCESS;
    }

    let pid1 = system::detect();
    system::mount_base(pid1);
    let boot = system::boot_args(pid1.mode);
    system::set_hostname(pid1.mode, &boot);
    system::configure_network(pid1.mode, &boot);
    system::trap_ctrl_alt_del(pid1.mode);

    let result =
        start_spec(boot.meta_path()).and_then(|(spec, id)| supervise::run(pid1.mode, &spec, &id));
    let code_value = match result {
        Ok(c) => c,
        Err(e) => {
            say!("{e}");
            1
        }
    };
    system::shut_down(pid1.mode, &boot, code_value);
    if pid1.mode == Mode::Vm {
        // reboot(2) failed: leaving PID 1 panics the kernel, which (panic=1) also ends
        // the VM.
        say!("exiting");
    }
    code(code_value)
}

fn start_spec(meta_path: &str) -> Result<(StartSpec, users::Identity), String> {
    let body = std::fs::read(meta_path).map_err(|e| format!("reading {meta_path}: {e}"))?;
    let meta: ImageMeta =
        serde_json::from_slice(&body).map_err(|e| format!("parsing {meta_path}: {e}"))?;
    let spec = StartSpec::from_meta(&meta);
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let id = users::resolve(&spec.user, &read("/etc/passwd"), &read("/etc/group"))?;
    Ok((spec, id))
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(1))
}
