//! Finding the mergen-init to inject, and refusing one a guest could not run.
//!
//! Looked for, first hit wins: `--init PATH`, `$MERGEN_INIT_BIN`, `mergen-init` next to
//! this executable, then the places cargo builds it for a static target
//! (`<target>/x86_64-unknown-linux-musl/release/` and the `static-init` dir that
//! `init/build-static.sh` uses). It must be a static ELF for the image's architecture:
//! the guest has neither our loader nor our libc.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const BUILD_HINT: &str = "build one with init/build-static.sh (or `cargo build --release -p mergen-init --target x86_64-unknown-linux-musl`) and pass it with --init or MERGEN_INIT_BIN";

fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            out.push(dir.join("mergen-init"));
            // exe is <target>/<profile>/mergen-image when run from a cargo build.
            if let Some(target) = dir.parent() {
                for triple in ["x86_64-unknown-linux-musl", "x86_64-unknown-linux-gnu"] {
                    out.push(target.join(triple).join("release/mergen-init"));
                    out.push(
                        target
                            .join("static-init")
                            .join(triple)
                            .join("release/mergen-init"),
                    );
                }
            }
        }
    }
    out
}

/// The ELF machine name of `arch` (an OCI architecture).
fn machine_of(arch: &str) -> Option<u16> {
    use goblin::elf::header::{EM_386, EM_AARCH64, EM_ARM, EM_RISCV, EM_X86_64};
    Some(match arch {
        "amd64" => EM_X86_64,
        "arm64" => EM_AARCH64,
        "arm" => EM_ARM,
        "386" => EM_386,
        "riscv64" => EM_RISCV,
        _ => return None,
    })
}

/// Why `bytes` cannot be a guest's init for `arch`, if it cannot.
pub fn unfit(bytes: &[u8], arch: &str) -> Option<String> {
    let elf = match goblin::elf::Elf::parse(bytes) {
        Ok(e) => e,
        Err(e) => return Some(format!("not an ELF executable ({e})")),
    };
    if let Some(interp) = elf.interpreter {
        return Some(format!("dynamically linked (needs {interp})"));
    }
    if machine_of(arch).is_some_and(|m| m != elf.header.e_machine) {
        return Some(format!(
            "built for {}, the image is {arch}",
            goblin::elf::header::machine_to_str(elf.header.e_machine)
        ));
    }
    None
}

/// The init binary's bytes and where they came from.
pub fn find(explicit: Option<&Path>, arch: &str) -> Result<(PathBuf, Vec<u8>)> {
    let mut refused = Vec::new();
    for path in candidates(explicit) {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::io(
                    format!("reading the init binary {}", path.display()),
                    e,
                ))
            }
        };
        match unfit(&bytes, arch) {
            None => return Ok((path, bytes)),
            Some(why) => refused.push(format!("{}: {why}", path.display())),
        }
    }
    Err(Error::Invalid(if refused.is_empty() {
        format!("no mergen-init found; {BUILD_HINT}")
    } else {
        format!(
            "no usable mergen-init ({}); {BUILD_HINT}",
            refused.join("; ")
        )
    }))
}
