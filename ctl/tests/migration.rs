//! Migration from the Go mergen-fire: VM directories written byte for byte as both Go
//! versions wrote them (the original, and the later one with `httpPort`, a `vsock`
//! block and `ip=` in the boot args) are listed, started, routed to through the real
//! `mergen-forwarder`, and deleted by mergend.
//!
//! Go VMs are Firecracker VMs, so mergend runs them with the Firecracker runtime
//! through its real launch path (net-setup, `ip netns exec <firecracker> --api-sock`,
//! configure-start over the API socket). Firecracker cannot run here: this test
//! binary stands in for it (see `firecracker_stand_in`), answering the API as the test
//! double does, and on `InstanceStart` plays the guest, a real HTTP server on the
//! guest IP inside the VM's namespace, at the address the boot args' `ip=` gives.
//!
//! Its own harness: mergend's embedded supervisor executes the `firecracker` binary,
//! which is this one (`MGR_FIRECRACKER_BIN`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use common::forwarder::{forwarder, through};
use common::vms::VmsGuard;
use common::{Mergend, Roots};
use mergen_testkit::{free_port, poll, TempDir};
use serde_json::Value;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--api-sock") {
        return firecracker_stand_in(&args);
    }
    if !mergen_testkit::is_root() {
        println!("SKIP: go_vm_directories_are_started_listed_routed_and_deleted needs root");
        return ExitCode::SUCCESS;
    }
    println!("test go_vm_directories_are_started_listed_routed_and_deleted ...");
    go_vm_directories_are_started_listed_routed_and_deleted();
    println!("test go_vm_directories_are_started_listed_routed_and_deleted ... ok");
    ExitCode::SUCCESS
}

/// One VM as a Go version left it.
struct GoVm {
    id: String,
    guest_ip: Ipv4Addr,
    created_at: &'static str,
    app: &'static str,
    /// Guest port the test routes to (443 for the original, its httpPort for the later).
    guest_port: u16,
    host_port: Option<u16>,
    later: bool,
}

impl GoVm {
    fn id8(&self) -> &str {
        &self.id[..8]
    }
}

/// Go's json.MarshalIndent(v, "", "  ") of the original's meta struct, field by
/// field: nil slices are `null`, empty strings and maps with `omitempty` are left
/// out, and `&`, `<`, `>` are escaped as Go escapes them.
fn go_meta_json(vm: &GoVm, roots: &Roots) -> String {
    let id = &vm.id;
    let cfg = roots.config().join(id).display().to_string();
    let run = roots.run().display().to_string();
    let data = roots.data().join(id).display().to_string();
    let img = roots.img().display().to_string();
    let ports = match vm.host_port {
        Some(p) => format!(
            "[\n    {{\n      \"guest\": {},\n      \"host\": {p},\n      \"protocol\": \"tcp\"\n    }}\n  ]",
            vm.guest_port
        ),
        None => "null".to_string(),
    };
    let http_port = if vm.later {
        format!("  \"httpPort\": {},\n", vm.guest_port)
    } else {
        String::new()
    };
    format!(
        r#"{{
  "id": "{id}",
  "createdAt": "{created}",
  "rootfs": "{img}/rootfs.ext4",
  "kernel": "{img}/vmlinux",
  "ports": {ports},
{http_port}  "guestIP": "{ip}",
  "tapName": "tap-{id8}",
  "netns": "mergen-{id8}",
  "metadata": {{
    "note": "a \u0026 b \u003cok\u003e",
    "owner": "team-{app}"
  }},
  "tags": {{
    "app": "{app}"
  }},
  "paths": {{
    "configDir": "{cfg}",
    "vmConfigPath": "{cfg}/vm.json",
    "metaPath": "{cfg}/meta.json",
    "hooksPath": "{cfg}/hooks.json",
    "envPath": "{cfg}/env",
    "runDir": "{run}/{id}",
    "socketPath": "{run}/{id}/mergen.socket",
    "lockPath": "{run}/{id}.lock",
    "dataDir": "{data}",
    "logsDir": "{data}/logs"
  }}
}}
"#,
        created = vm.created_at,
        ip = vm.guest_ip,
        id8 = vm.id8(),
        app = vm.app,
    )
}

/// Firecracker's config file as the Go versions wrote it: the original without an
/// `ip=` boot argument (the runtime adds it at configure-start), the later with it
/// and with a vsock device.
fn go_vm_json(vm: &GoVm, roots: &Roots, gateway: Ipv4Addr) -> String {
    let img = roots.img().display().to_string();
    let mac = mergen_model::names::guest_mac(&vm.id);
    let (boot_args, vsock) = if vm.later {
        (
            format!(
                "console=ttyS0 reboot=k panic=1 pci=off init=/sbin/init ip={}::{gateway}:255.255.255.0::eth0:off",
                vm.guest_ip
            ),
            format!(
                ",\n  \"vsock\": {{\n    \"guest_cid\": 3,\n    \"uds_path\": \"{}/{}/vsock.sock\"\n  }}",
                roots.run().display(),
                vm.id
            ),
        )
    } else {
        (
            "console=ttyS0 reboot=k panic=1 pci=off".to_string(),
            String::new(),
        )
    };
    format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{img}/vmlinux",
    "boot_args": "{boot_args}"
  }},
  "drives": [
    {{
      "drive_id": "rootfs",
      "path_on_host": "{img}/rootfs.ext4",
      "is_root_device": true,
      "is_read_only": false
    }}
  ],
  "machine-config": {{
    "vcpu_count": 1,
    "mem_size_mib": 512,
    "smt": false
  }},
  "network-interfaces": [
    {{
      "iface_id": "eth0",
      "host_dev_name": "tap-{id8}",
      "guest_mac": "{mac}"
    }}
  ]{vsock}
}}
"#,
        id8 = vm.id8(),
    )
}

/// The systemd env file: `KEY='value'` sorted by key, `'` written as `'\''`.
fn go_env(vm: &GoVm, roots: &Roots) -> String {
    let id = &vm.id;
    let cfg = roots.config().join(id).display().to_string();
    let run = roots.run().join(id).display().to_string();
    let data = roots.data().join(id).display().to_string();
    let mut lines = vec![
        "APP_MODE='it'\\''s'".to_string(),
        format!("MGN_CONFIG_DIR='{cfg}'"),
        format!("MGN_DATA_DIR='{data}'"),
        format!("MGN_GUEST_IP='{}'", vm.guest_ip),
        format!("MGN_HOOKS_JSON='{cfg}/hooks.json'"),
    ];
    if vm.later {
        lines.push(format!("MGN_HTTP_PORT='{}'", vm.guest_port));
    }
    lines.extend([
        format!("MGN_LOG_DIR='{data}/logs'"),
        format!("MGN_META_JSON='{cfg}/meta.json'"),
        format!("MGN_NETNS='mergen-{}'", vm.id8()),
    ]);
    if let Some(p) = vm.host_port {
        lines.push(format!("MGN_PUBLISH_{}='{p}/tcp'", vm.guest_port));
    }
    lines.extend([
        format!("MGN_RUN_DIR='{run}'"),
        format!("MGN_SOCKET_PATH='{run}/mergen.socket'"),
        format!("MGN_TAP_NAME='tap-{}'", vm.id8()),
        format!("MGN_VM_ID='{id}'"),
        format!("MGN_VM_JSON='{cfg}/vm.json'"),
    ]);
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The hooks.json the original wrote when the create request had hooks (the type as
/// the user gave it).
fn go_hooks_json(record: &Path) -> String {
    format!(
        r#"{{
  "onDelete": [
    {{
      "type": "Exec",
      "cmd": [
        "/bin/sh",
        "-c",
        "echo deleted {{{{.ID}}}} {{{{.Metadata.owner}}}} \u003e\u003e {}"
      ]
    }}
  ]
}}
"#,
        record.display()
    )
}

fn write_go_vm(vm: &GoVm, roots: &Roots, gateway: Ipv4Addr, record: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    let dir = roots.config().join(&vm.id);
    let mk = |p: &Path| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(p)
            .unwrap()
    };
    mk(&dir);
    mk(&roots.data().join(&vm.id).join("logs"));
    mk(&roots.run().join(&vm.id));
    std::fs::write(dir.join("meta.json"), go_meta_json(vm, roots)).unwrap();
    std::fs::write(dir.join("vm.json"), go_vm_json(vm, roots, gateway)).unwrap();
    std::fs::write(dir.join("env"), go_env(vm, roots)).unwrap();
    if !vm.later {
        std::fs::write(dir.join("hooks.json"), go_hooks_json(record)).unwrap();
    }
}

fn go_vm_directories_are_started_listed_routed_and_deleted() {
    let roots = Roots::new("migration");
    let pid = std::process::id();
    let net = format!("10.{}.{}", 100 + pid % 50, 100 + pid % 100);
    let cidr = format!("{net}.0/24");
    let gateway: Ipv4Addr = format!("{net}.1").parse().unwrap();
    let record = roots.dir.join("hooks.txt");
    let original = GoVm {
        id: uuid::Uuid::new_v4().to_string(),
        guest_ip: format!("{net}.2").parse().unwrap(),
        created_at: "2025-06-01T10:00:00.123456789Z",
        app: "legacy",
        guest_port: 443,
        host_port: Some(free_port()),
        later: false,
    };
    let later = GoVm {
        id: uuid::Uuid::new_v4().to_string(),
        guest_ip: format!("{net}.3").parse().unwrap(),
        created_at: "2025-07-01T10:00:00.5Z",
        app: "newer",
        guest_port: 8080,
        host_port: None,
        later: true,
    };
    for vm in [&original, &later] {
        write_go_vm(vm, &roots, gateway, &record);
    }
    let me = std::env::current_exe().unwrap();
    let env = [
        ("MGR_RUNTIME", "firecracker"),
        ("MGR_SUPERVISOR", "embedded"),
        ("MGR_JAILER", "0"),
        ("MGR_FIRECRACKER_BIN", me.to_str().unwrap()),
        ("MGR_GUEST_CIDR", cidr.as_str()),
        ("MGR_STOP_TIMEOUT_SECONDS", "5"),
    ];
    let mut guard = VmsGuard::new(&roots, &env);
    guard.ids = vec![original.id.clone(), later.id.clone()];
    let m = Mergend::start(&roots, &env);

    // Listed, newest createdAt first, with the Go fields read as written.
    let (code, list) = m.get_json("/v1/vms");
    assert_eq!(code, 200, "{list}");
    let items = list["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [later.id.as_str(), original.id.as_str()], "{list}");
    assert_eq!(items[0]["httpPort"], 8080);
    assert_eq!(items[0]["network"]["ports"], serde_json::json!([]));
    assert_eq!(items[1]["metadata"]["note"], "a & b <ok>");
    assert_eq!(
        items[1]["network"]["guestIP"],
        original.guest_ip.to_string()
    );
    assert_eq!(items[1]["createdAt"], original.created_at);

    // Started through the real launch path.
    for vm in [&original, &later] {
        let (code, out) = m.curl("POST", &format!("/v1/vms/{}/start", vm.id), &[]);
        assert_eq!(code, 200, "{out}\n{}", m.log_text());
        let (_, s) = m.get_json(&format!("/v1/vms/{}", vm.id));
        assert_eq!(s["state"], "running", "{s}");
    }
    // The original's vm.json had no ip= argument: configure-start added it.
    let calls = api_calls(&roots, &original.id);
    let boot = calls
        .iter()
        .find(|c| c["path"] == "/boot-source")
        .expect("boot-source configured");
    assert_eq!(
        boot["body"]["boot_args"],
        format!(
            "console=ttyS0 reboot=k panic=1 pci=off ip={}::{gateway}:255.255.255.0::eth0:off",
            original.guest_ip
        )
    );
    assert!(calls
        .iter()
        .any(|c| c["body"]["action_type"] == "InstanceStart"));
    // The later version's vsock block reaches Firecracker's /vsock; its ip= is kept.
    let calls = api_calls(&roots, &later.id);
    let vsock = calls
        .iter()
        .find(|c| c["path"] == "/vsock")
        .expect("vsock configured");
    assert_eq!(vsock["body"]["guest_cid"], 3);
    let boot = calls.iter().find(|c| c["path"] == "/boot-source").unwrap();
    let args = boot["body"]["boot_args"].as_str().unwrap();
    assert_eq!(args.matches("ip=").count(), 1, "{args}");

    // Routed by the forwarder, by tag alias and by the id's first 8 characters.
    let fwd_dir = TempDir::new("migration-fwd");
    let (_fwd, ports) = forwarder(&roots.config(), fwd_dir.path(), &[443, 8080]);
    for (vm, port) in [(&original, ports[0]), (&later, ports[1])] {
        let want = format!("guest {} port {}\n", vm.id, vm.guest_port);
        for name in [
            format!("{}.localhost", vm.app),
            format!("{}.localhost", vm.id8()),
        ] {
            let got = poll(Duration::from_secs(20), || {
                through(&name, port, "/").filter(|b| *b == want)
            });
            assert!(
                got.is_some(),
                "{name} via :{port}: {:?}\n{}",
                through(&name, port, "/"),
                std::fs::read_to_string(fwd_dir.path().join("forwarder.log")).unwrap_or_default()
            );
        }
    }
    // The original's published port reaches the guest too.
    let hp = original.host_port.unwrap();
    let published = poll(Duration::from_secs(10), || {
        mergen_testkit::curl_get(None, &format!("http://127.0.0.1:{hp}/")).ok()
    });
    assert_eq!(
        published.as_deref(),
        Some(format!("guest {} port 443\n", original.id).as_str())
    );

    // Deleted: the Go hooks.json runs, the files go, the route goes.
    for vm in [&original, &later] {
        let (code, out) = m.curl("DELETE", &format!("/v1/vms/{}", vm.id), &[]);
        assert_eq!(code, 200, "{out}\n{}", m.log_text());
        assert!(!roots.config().join(&vm.id).exists());
        assert!(!roots.data().join(&vm.id).exists());
        assert!(!Path::new(&format!("/run/netns/mergen-{}", vm.id8())).exists());
    }
    let recorded = poll(Duration::from_secs(10), || {
        std::fs::read_to_string(&record)
            .ok()
            .filter(|t| !t.is_empty())
    });
    assert_eq!(
        recorded.as_deref(),
        Some(format!("deleted {} team-legacy\n", original.id).as_str())
    );
    let gone = poll(Duration::from_secs(10), || {
        through("legacy.localhost", ports[0], "/")
            .is_none()
            .then_some(())
    });
    assert!(gone.is_some(), "still routed after delete");
    let (_, list) = m.get_json("/v1/vms");
    assert_eq!(list["items"], serde_json::json!([]));
}

/// The API calls the stand-in recorded for VM `id`.
fn api_calls(roots: &Roots, id: &str) -> Vec<Value> {
    std::fs::read_to_string(roots.run().join(id).join("api-calls.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `firecracker --api-sock <path> --id <id>`, run by mergend inside the VM's
/// namespace: Firecracker's API on the socket (every call recorded next to it,
/// answered 204), and on `InstanceStart` the guest: the guest IP from the boot args'
/// `ip=` on loopback, and an HTTP server on ports 443 and 8080 of it. Ctrl-Alt-Del
/// ends it, as it ends a guest that shuts down.
fn firecracker_stand_in(args: &[String]) -> ExitCode {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    let socket = PathBuf::from(arg("--api-sock"));
    let id = arg("--id");
    let record = socket.with_file_name("api-calls.jsonl");
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("stand-in: binding {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    let mut boot_args = String::new();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let mut reader = BufReader::new(conn);
        // Keep-alive: several calls may come on one connection.
        while let Some((method, path, body)) = read_call(&mut reader) {
            let entry = serde_json::json!({"method": method, "path": path, "body": body});
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&record)
                .unwrap();
            let _ = writeln!(f, "{entry}");
            if path == "/boot-source" {
                boot_args = body["boot_args"].as_str().unwrap_or_default().to_string();
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
            match body["action_type"].as_str() {
                Some("InstanceStart") => play_guest(&id, &boot_args),
                Some("SendCtrlAltDel") => return ExitCode::SUCCESS,
                _ => {}
            }
        }
    }
    ExitCode::SUCCESS
}

fn read_call(r: &mut BufReader<UnixStream>) -> Option<(String, String, Value)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut words = line.split_whitespace();
    let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((
        method,
        path,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

/// The guest: its IP (from `ip=<guest>::...`) on loopback, and HTTP answers naming
/// the VM and the port.
fn play_guest(id: &str, boot_args: &str) {
    let Some(ip) = boot_args
        .split_whitespace()
        .find_map(|a| a.strip_prefix("ip="))
        .and_then(|v| v.split(':').next())
        .and_then(|v| v.parse::<Ipv4Addr>().ok())
    else {
        eprintln!("stand-in: no ip= in the boot args {boot_args:?}");
        return;
    };
    for argv in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{ip}/32"), "dev", "lo"],
    ] {
        let st = Command::new("ip").args(&argv).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("stand-in: ip {argv:?} failed");
        }
    }
    for port in [443u16, 8080] {
        let Ok(l) = TcpListener::bind((ip, port)) else {
            eprintln!("stand-in: cannot bind {ip}:{port}");
            continue;
        };
        let id = id.to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("guest {id} port {port}\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
}
