//! From an OCI image to a VM reached through the forwarder, with every real component
//! and no Firecracker: a small image (busybox-static's httpd serving a page and a CGI as
//! a user of the image, from its working dir) is written as an OCI layout, converted by
//! the real `mergen-image` (whose suggested request creates a Firecracker VM of it as
//! is), created as a process VM with `process.root` through a real
//! mergend's API, started (the image's own mergen-init boots it inside the VM's
//! namespaces), reached with curl through the real `mergen-forwarder` by SNI and through
//! its published host port, stopped (the command's trap gets SIGTERM), and deleted with
//! nothing left: no namespace, no process, no mount.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::forwarder::{forwarder, sibling_bin, through};
use common::vms::{process_env, VmsGuard};
use common::{Mergend, Roots};
use mergen_testkit::oci::{self, layer_tar, Layer, E};
use mergen_testkit::{
    curl_get, first_child, free_port, have_busybox, mounts_naming, poll, require_root, run_out,
    running, static_init, wait_for, TempDir,
};
use serde_json::json;

/// The image's start command: httpd in the foreground of a shell that, on SIGTERM,
/// leaves a marker, stops httpd and exits 0.
const START: &str = r#"trap 'echo term > /srv/www/got-term; kill $httpd; wait $httpd; exit 0' TERM
httpd -f -p 8080 -h /srv/www &
httpd=$!
wait $httpd"#;

/// What the image's user, env and hostname look like from inside (a CGI of the image).
const WHOAMI: &[u8] = br#"#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "uid=$(id -u) gid=$(id -g) greeting=$GREETING host=$(hostname) vm=${MGN_VM_ID:-none} token=${MGR_API_TOKEN:-none}"
"#;

const PAGE: &str = "hello from the image\n";

/// The image: busybox with its applets, a user `www` (1000), the site in its working
/// dir `/srv/www` owned by it, and the config (entrypoint, cmd, env, user, port).
fn write_image(layout: &Path) {
    let busybox = fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let mut entries = vec![
        E::Dir("bin", 0o755),
        E::File("bin/busybox", 0o755, &busybox),
        E::Dir("etc", 0o755),
        E::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1000:www:/srv/www:/bin/sh\n",
        ),
        E::File("etc/group", 0o644, b"root:x:0:\nwww:x:1000:\n"),
        E::Dir("srv", 0o755),
        E::OwnedDir("srv/www", 0o755, 1000, 1000),
        E::File("srv/www/index.html", 0o644, PAGE.as_bytes()),
        E::Dir("srv/www/cgi-bin", 0o755),
        E::File("srv/www/cgi-bin/whoami", 0o755, WHOAMI),
    ];
    entries.extend(oci::busybox_applets(&[
        "sh", "httpd", "id", "hostname", "echo", "kill", "sleep", "true",
    ]));
    let config = json!({
        "created": "2025-01-02T03:04:05Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [START],
            "Env": ["PATH=/bin", "GREETING=hello-from-image"],
            "WorkingDir": "/srv/www",
            "User": "www",
            "ExposedPorts": {"8080/tcp": {}}
        }
    });
    oci::write_layout(
        layout,
        "v1",
        &[Layer::gzip(layer_tar(&entries))],
        oci::CONFIG_MEDIA_TYPE,
        config,
    );
}

/// `mergen-image build --from-oci-dir <layout> --output-dir <out>`: the real converter.
fn convert(layout: &Path, out: &Path) {
    let run = Command::new(sibling_bin("mergen-image", "mergen-image"))
        .args(["build", "--quiet", "--from-oci-dir"])
        .arg(layout)
        .args(["--image", "v1", "--output-dir"])
        .arg(out)
        .env("MERGEN_INIT_BIN", static_init())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "mergen-image: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn ns(pid: &str, kind: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .ino()
}

/// The effective uid of `pid` (`Uid:` in its status: real, effective, saved, fs).
fn uid_of(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn an_image_boots_as_a_vm_behind_the_forwarder_and_leaves_nothing() {
    require_root!();
    if !have_busybox() {
        return;
    }
    let roots = Roots::new("image-vm");
    let layout = roots.dir.join("layout");
    write_image(&layout);
    let out = roots.img().join("web");
    convert(&layout, &out);
    let rootfs: PathBuf = out.join("rootfs");
    let suggested: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("suggested-vm-request.json")).unwrap()).unwrap();
    assert_eq!(suggested["httpPort"], 8080, "{suggested}");

    let pid = std::process::id();
    let cidr = format!("10.{}.{}.0/24", 150 + pid % 50, 100 + pid % 100);
    let mut env = process_env(&cidr).to_vec();
    // Long enough that a lost SIGTERM could not pass for a quick stop (the marker of
    // the command's trap is what says it got one), short enough that such a stop still
    // ends, by SIGKILL, within curl's 30 s and the marker's absence is what fails.
    env.retain(|(k, _)| *k != "MGR_STOP_TIMEOUT_SECONDS");
    env.push(("MGR_STOP_TIMEOUT_SECONDS", "20"));
    // mergend's secret, which must not reach the image's command.
    env.push(("MGR_API_TOKEN", "image-vm-secret-token"));
    let mut guard = VmsGuard::new(&roots, &env);
    let m = Mergend::start(&roots, &env);
    let auth = ["-H", "authorization: Bearer image-vm-secret-token"];

    // The converter's suggested request is a valid create for a Firecracker VM of the
    // image (with a kernel of the operator's, here a stand-in inside the image roots):
    // the VM's config boots the image's rootfs.ext4 with its init.
    let kernel = roots.img().join("vmlinux");
    fs::write(&kernel, b"a kernel").unwrap();
    let mut suggested = suggested.clone();
    suggested["kernel"] = json!(kernel);
    let fc_body = suggested.to_string();
    let mut args = auth.to_vec();
    args.extend([
        "-H",
        "content-type: application/json",
        "--data-binary",
        &fc_body,
    ]);
    let (code, created) = m.curl("POST", "/v1/vms", &args);
    assert_eq!(code, 201, "{created}\n{}", m.log_text());
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let fc_id = created["id"].as_str().unwrap().to_string();
    guard.ids.push(fc_id.clone());
    let vm_json: serde_json::Value =
        serde_json::from_slice(&fs::read(roots.config().join(&fc_id).join("vm.json")).unwrap())
            .unwrap();
    assert_eq!(
        vm_json["drives"][0]["path_on_host"],
        json!(out.join("rootfs.ext4").canonicalize().unwrap()),
        "{vm_json}"
    );
    assert_eq!(vm_json["boot-source"]["kernel_image_path"], json!(kernel));
    let boot_args = vm_json["boot-source"]["boot_args"].as_str().unwrap();
    assert!(
        boot_args.contains("init=/sbin/init mergen.meta=/etc/mergen/image-meta.json"),
        "{boot_args}"
    );
    let (code, out_delete) = m.curl("DELETE", &format!("/v1/vms/{fc_id}"), &auth);
    assert_eq!(code, 200, "{out_delete}\n{}", m.log_text());

    let host_port = free_port();
    let body = json!({
        "process": {"root": rootfs},
        "tags": {"app": "img1"},
        "httpPort": 8080,
        "ports": [{"guest": 8080, "host": host_port}],
    })
    .to_string();
    let mut args = auth.to_vec();
    args.extend([
        "-H",
        "content-type: application/json",
        "--data-binary",
        &body,
    ]);
    let (code, created) = m.curl("POST", "/v1/vms", &args);
    assert_eq!(code, 201, "{created}\n{}", m.log_text());
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    guard.ids.push(id.clone());
    let id8 = id[..8].to_string();
    let (code, out_start) = m.curl("POST", &format!("/v1/vms/{id}/start"), &auth);
    assert_eq!(code, 200, "{out_start}\n{}", m.log_text());

    // Through the forwarder by SNI, and through the published port.
    let fwd_dir = TempDir::new("image-vm-fwd");
    let (_fwd, ports) = forwarder(&roots.config(), fwd_dir.path(), &[8080]);
    let guest_log = roots.data().join(&id).join("logs/guest.log");
    let page = poll(Duration::from_secs(30), || {
        through("img1.localhost", ports[0], "/").filter(|b| b == PAGE)
    });
    assert!(
        page.is_some(),
        "img1.localhost: {:?}\nguest log:\n{}\nforwarder log:\n{}",
        through("img1.localhost", ports[0], "/"),
        fs::read_to_string(&guest_log).unwrap_or_default(),
        fs::read_to_string(fwd_dir.join("forwarder.log")).unwrap_or_default()
    );
    let published = wait_for("the published port", Duration::from_secs(10), || {
        curl_get(None, &format!("http://127.0.0.1:{host_port}/index.html")).ok()
    });
    assert_eq!(published, PAGE);
    // The answer comes from the image's httpd, as the image's user, with the image's
    // env and none of the VM's variables nor mergend's token.
    let whoami = through(&format!("{id8}.localhost"), ports[0], "/cgi-bin/whoami");
    assert_eq!(
        whoami.as_deref(),
        Some(
            format!("uid=1000 gid=1000 greeting=hello-from-image host=mergen-{id8} vm=none token=none\n")
                .as_str()
        ),
        "guest log:\n{}",
        fs::read_to_string(&guest_log).unwrap_or_default()
    );

    // The processes: launcher (the guest pid) → init → shell → httpd, the last three in
    // their own PID and mount namespaces, in the VM's network namespace, chrooted.
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(roots.run().join(&id).join("state.json")).unwrap())
            .unwrap();
    let launcher = state["guestPid"].as_u64().unwrap() as u32;
    let init = first_child(launcher).expect("init");
    let shell = first_child(init).expect("the start command");
    let httpd = first_child(shell).expect("httpd");
    let vm_net = fs::metadata(format!("/run/netns/mergen-{id8}"))
        .unwrap()
        .ino();
    for pid in [init, shell, httpd] {
        let p = pid.to_string();
        assert_ne!(ns(&p, "pid"), ns("self", "pid"), "pid {pid}");
        assert_ne!(ns(&p, "mnt"), ns("self", "mnt"), "pid {pid}");
        assert_eq!(ns(&p, "net"), vm_net, "pid {pid}");
        assert_eq!(
            fs::read_link(format!("/proc/{pid}/root")).unwrap(),
            rootfs.canonicalize().unwrap(),
            "pid {pid}"
        );
    }
    assert_eq!(uid_of(httpd), Some(1000));
    assert_eq!(uid_of(init), Some(0));

    // Stop: SIGTERM reaches the command's trap through the launcher and init.
    let (code, out_stop) = m.curl("POST", &format!("/v1/vms/{id}/stop"), &auth);
    assert_eq!(code, 200, "{out_stop}\n{}", m.log_text());
    assert_eq!(
        fs::read_to_string(rootfs.join("srv/www/got-term"))
            .ok()
            .as_deref(),
        Some("term\n"),
        "the command got no SIGTERM; guest log:\n{}",
        fs::read_to_string(&guest_log).unwrap_or_default()
    );
    let (_, summary) = m.curl("GET", &format!("/v1/vms/{id}"), &auth);
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["state"], "stopped", "{summary}");

    // Delete: nothing of the VM is left on the host.
    let (code, out_delete) = m.curl("DELETE", &format!("/v1/vms/{id}"), &auth);
    assert_eq!(code, 200, "{out_delete}\n{}", m.log_text());
    for pid in [launcher, init, shell, httpd] {
        assert!(!running(pid), "pid {pid} outlived the VM");
    }
    assert!(
        mounts_naming(&rootfs).is_empty(),
        "{:?}",
        mounts_naming(&rootfs)
    );
    assert!(!run_out(&["ip", "netns", "list"]).contains(&format!("mergen-{id8}")));
    assert!(!run_out(&["ip", "-o", "link"]).contains(&format!("vh-{id8}")));
    assert!(!roots.config().join(&id).exists());
    let unrouted = poll(Duration::from_secs(10), || {
        through("img1.localhost", ports[0], "/")
            .is_none()
            .then_some(())
    });
    assert!(unrouted.is_some(), "still routed after delete");
    // The image itself is the operator's: still whole.
    assert!(rootfs.join("sbin/init").is_file());
}
