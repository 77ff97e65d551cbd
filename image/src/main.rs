//! `mergen-image build`: see README.md.

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use mergen_envtable::{help_text, Env, Var};
use mergen_image::layout::Platform;
use mergen_image::registry::Access;
use mergen_image::{build, Options, Source};

/// The environment the converter reads.
const ENV: &[Var] = &[
    Var::unset(
        "MERGEN_INIT_BIN",
        "the mergen-init to inject (a static ELF); --init wins",
    ),
    Var::unset(
        "MERGEN_IMAGE_CA_FILE",
        "PEM CA certificates trusted for registries besides the system's; --ca-file wins",
    ),
    Var::computed(
        "DOCKER_CONFIG",
        "~/.docker",
        "Docker's config dir: registry credentials (auths, credHelpers, credsStore)",
    ),
];

fn usage() -> String {
    format!(
        "mergen-image: an OCI image to a bootable rootfs, without Docker.

usage:
  mergen-image build --image REF [options]           pull from a registry
  mergen-image build --from-archive TAR [options]    a `docker save` archive
  mergen-image build --from-oci-dir DIR [options]    an OCI image layout

options:
  --image REF            the image (with an archive or layout: which one it holds)
  --output-dir DIR       where outputs go (default: ./artifacts/converter/<name>)
  --name N               <name> above (default: the reference, sanitised)
  --size-mib N           ext4 size (default: the content plus a quarter plus 64 MiB)
  --platform OS/ARCH     platform to take from a multi-platform image [linux/amd64]
  --skip-pull            use only DIR/image-cache (no network)
  --init PATH            the mergen-init to inject
  --ca-file PEM          extra CA certificates for registries
  --quiet                no progress line

outputs in DIR: rootfs/ rootfs.tar rootfs.ext4 image-meta.json suggested-bootargs.txt
suggested-vm-request.json, and image-cache/ (an OCI layout of pulled blobs).

environment:
{}",
        help_text(ENV)
    )
}

fn parse(args: &[String]) -> Result<Options, String> {
    let env = Env::from_process(ENV);
    let mut o = Options {
        image: None,
        source: Source::Registry { skip_pull: false },
        output_dir: None,
        name: None,
        size_mib: None,
        platform: "linux/amd64".parse().expect("a valid platform"),
        init: env.opt("MERGEN_INIT_BIN").map(PathBuf::from),
        access: Access {
            ca_file: env.opt("MERGEN_IMAGE_CA_FILE").map(PathBuf::from),
            docker_config_dir: env
                .opt("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker"))),
        },
        progress: true,
    };
    let mut skip_pull = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        // Go's flag package (the original's) also took `-flag`; so do we.
        let name = flag
            .strip_prefix("--")
            .or_else(|| flag.strip_prefix('-'))
            .unwrap_or(flag);
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match name {
            "image" => o.image = Some(value()?),
            "output-dir" => o.output_dir = Some(PathBuf::from(value()?)),
            "name" => o.name = Some(value()?),
            "size-mib" => {
                let v = value()?;
                let n: u64 = v
                    .parse()
                    .map_err(|_| format!("--size-mib {v:?}: expected a whole number of MiB"))?;
                o.size_mib = (n > 0).then_some(n);
            }
            "platform" => o.platform = value()?.parse::<Platform>().map_err(|e| e.to_string())?,
            "skip-pull" => skip_pull = true,
            "from-archive" => o.source = Source::Archive(PathBuf::from(value()?)),
            "from-oci-dir" => o.source = Source::OciDir(PathBuf::from(value()?)),
            "init" => o.init = Some(PathBuf::from(value()?)),
            "ca-file" => o.access.ca_file = Some(PathBuf::from(value()?)),
            "quiet" => o.progress = false,
            _ => return Err(format!("unknown option {flag:?} (see --help)")),
        }
    }
    match &o.source {
        Source::Registry { .. } => {
            if o.image.is_none() {
                return Err("--image REF (or --from-archive / --from-oci-dir) is required".into());
            }
            o.source = Source::Registry { skip_pull };
        }
        _ if skip_pull => return Err("--skip-pull is for registry images only".into()),
        _ => {}
    }
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = match args.first().map(String::as_str) {
        Some("build") => &args[1..],
        Some("-h" | "--help" | "help") | None => {
            print!("{}", usage());
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        // The original had no subcommand: `-image REF ...` alone still builds.
        Some(a) if a.starts_with('-') => &args[..],
        Some(other) => {
            eprintln!("mergen-image: unknown command {other:?} (see --help)");
            return ExitCode::from(2);
        }
    };
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let options = match parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mergen-image: {e}");
            return ExitCode::from(2);
        }
    };
    match build(&options) {
        Ok(done) => {
            for s in &done.skipped {
                eprintln!(
                    "mergen-image: warning: not reproduced in rootfs/ (kept in rootfs.tar): {s}"
                );
            }
            if !rustix::process::geteuid().is_root() {
                eprintln!("mergen-image: warning: not root: rootfs/ and rootfs.ext4 carry your uid; rootfs.tar has the image's owners");
            }
            let d = &done.output_dir;
            println!("image: {}", done.image);
            println!("output dir: {}", d.display());
            println!("rootfs dir: {}", d.join("rootfs").display());
            println!("rootfs tar: {}", d.join("rootfs.tar").display());
            println!(
                "rootfs ext4: {} ({} MiB)",
                d.join("rootfs.ext4").display(),
                done.ext4_size_mib
            );
            println!("image metadata: {}", d.join("image-meta.json").display());
            println!(
                "suggested boot args: {}",
                d.join("suggested-bootargs.txt").display()
            );
            println!(
                "suggested VM request: {}",
                d.join("suggested-vm-request.json").display()
            );
            println!("start command: {:?}", done.meta.start_cmd);
            if done.meta.suggested_http_port > 0 {
                println!("suggested httpPort: {}", done.meta.suggested_http_port);
            }
            println!("init: {}", done.init_from.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mergen-image: error: {e}");
            ExitCode::FAILURE
        }
    }
}
