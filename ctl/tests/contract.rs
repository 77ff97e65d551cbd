//! The compatibility contract with the original (shared/spec/compatibility.md), pinned
//! byte for byte: the files a create writes, the response bodies, the summary's
//! fields, the create rules and the allocation.

mod common;

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;

use common::{Mergend, Roots};
use serde_json::Value;

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id in response").to_string()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn create_writes_the_originals_files_byte_for_byte() {
    let roots = Roots::new("golden");
    std::fs::write(roots.img().join("data.ext4"), b"data").unwrap();
    let m = Mergend::start(&roots, &[]);
    let img = roots.img().display().to_string();
    let (code, v) = m.create(&roots.body_with(&format!(
        r#","dataDisk":"{img}/data.ext4","vcpu":2,"memMiB":128,
           "ports":[{{"guest":80,"host":0}},{{"guest":53,"host":0,"protocol":"udp"}},{{"guest":80,"host":0,"protocol":"udp"}}],
           "metadata":{{"team":"core","n":1}},"tags":{{"app":"app1"}},
           "extraEnv":{{"":"skipped"," ":"blank","Z_LAST":"z","A_FIRST":"it's"}},
           "hooks":{{"onStop":[{{"type":"exec","cmd":["true","{{{{.ID}}}}"],"timeoutMs":100}}]}}"#
    )));
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let short = &id[..8];
    let dir = roots.config().join(&id);
    let (cfg, run, data) = (
        dir.display().to_string(),
        roots.run().join(&id).display().to_string(),
        roots.data().join(&id).display().to_string(),
    );
    let lock = roots.run().join(format!("{id}.lock")).display().to_string();

    let meta = read(dir.join("meta.json"));
    let created_at = serde_json::from_str::<Value>(&meta).unwrap()["createdAt"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        time::OffsetDateTime::parse(&created_at, &time::format_description::well_known::Rfc3339)
            .is_ok_and(|t| t.offset().is_utc())
            && created_at.ends_with('Z'),
        "createdAt {created_at:?} is not RFC 3339 UTC"
    );
    let want_meta = format!(
        r#"{{
  "id": "{id}",
  "createdAt": "{created_at}",
  "rootfs": "{img}/rootfs.ext4",
  "kernel": "{img}/vmlinux",
  "dataDisk": "{img}/data.ext4",
  "ports": [
    {{
      "guest": 80,
      "host": 20000,
      "protocol": "tcp"
    }},
    {{
      "guest": 53,
      "host": 20001,
      "protocol": "udp"
    }},
    {{
      "guest": 80,
      "host": 20002,
      "protocol": "udp"
    }}
  ],
  "guestIP": "172.30.0.2",
  "tapName": "tap-{short}",
  "netns": "mergen-{short}",
  "metadata": {{
    "n": 1,
    "team": "core"
  }},
  "tags": {{
    "app": "app1"
  }},
  "paths": {{
    "configDir": "{cfg}",
    "vmConfigPath": "{cfg}/vm.json",
    "metaPath": "{cfg}/meta.json",
    "hooksPath": "{cfg}/hooks.json",
    "envPath": "{cfg}/env",
    "runDir": "{run}",
    "socketPath": "{run}/mergen.socket",
    "lockPath": "{lock}",
    "dataDir": "{data}",
    "logsDir": "{data}/logs"
  }},
  "hooks": {{
    "onStop": [
      {{
        "type": "exec",
        "cmd": [
          "true",
          "{{{{.ID}}}}"
        ],
        "timeoutMs": 100
      }}
    ]
  }}
}}
"#
    );
    assert_eq!(meta, want_meta);

    let mac = format!(
        "02:FC:{}:{}:{}:01",
        &short[0..2].to_uppercase(),
        &short[2..4].to_uppercase(),
        &short[4..6].to_uppercase()
    );
    let want_vm = format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{img}/vmlinux",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off"
  }},
  "drives": [
    {{
      "drive_id": "rootfs",
      "path_on_host": "{img}/rootfs.ext4",
      "is_root_device": true,
      "is_read_only": false
    }},
    {{
      "drive_id": "data",
      "path_on_host": "{img}/data.ext4",
      "is_root_device": false,
      "is_read_only": false
    }}
  ],
  "machine-config": {{
    "vcpu_count": 2,
    "mem_size_mib": 128,
    "smt": false
  }},
  "network-interfaces": [
    {{
      "iface_id": "eth0",
      "host_dev_name": "tap-{short}",
      "guest_mac": "{mac}"
    }}
  ]
}}
"#
    );
    assert_eq!(read(dir.join("vm.json")), want_vm);

    let want_hooks = r#"{
  "onStop": [
    {
      "type": "exec",
      "cmd": [
        "true",
        "{{.ID}}"
      ],
      "timeoutMs": 100
    }
  ]
}
"#;
    assert_eq!(read(dir.join("hooks.json")), want_hooks);

    // One key per guest port: the later binding (by host port) wins guest port 80.
    let want_env = format!(
        "\
A_FIRST='it'\\''s'
MGN_CONFIG_DIR='{cfg}'
MGN_DATA_DIR='{data}'
MGN_GUEST_IP='172.30.0.2'
MGN_HOOKS_JSON='{cfg}/hooks.json'
MGN_LOG_DIR='{data}/logs'
MGN_META_JSON='{cfg}/meta.json'
MGN_NETNS='mergen-{short}'
MGN_PUBLISH_53='20001/udp'
MGN_PUBLISH_80='20002/udp'
MGN_RUN_DIR='{run}'
MGN_SOCKET_PATH='{run}/mergen.socket'
MGN_TAP_NAME='tap-{short}'
MGN_VM_ID='{id}'
MGN_VM_JSON='{cfg}/vm.json'
Z_LAST='z'
"
    );
    assert_eq!(read(dir.join("env")), want_env);
    assert!(roots.data().join(&id).join("logs").is_dir());
    assert!(roots.run().join(&id).is_dir());

    // Empty optionals are omitted, and no hooks means no hooks.json.
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 201, "{v}");
    let id2 = id_of(&v);
    let meta2: Value =
        serde_json::from_str(&read(roots.config().join(&id2).join("meta.json"))).unwrap();
    assert_eq!(
        keys(&meta2),
        set(&[
            "id",
            "createdAt",
            "rootfs",
            "kernel",
            "ports",
            "guestIP",
            "tapName",
            "netns",
            "paths"
        ])
    );
    assert_eq!(meta2["guestIP"], "172.30.0.3");
    assert!(!roots.config().join(&id2).join("hooks.json").exists());
}

#[test]
fn responses_and_summaries_have_the_originals_shape() {
    let roots = Roots::new("shape");
    let m = Mergend::start(&roots, &[]);
    let (code, body) = m.curl(
        "POST",
        "/v1/vms",
        &[
            "--data-binary",
            &roots.body_with(r#","ports":[{"guest":8080,"host":0}],"metadata":{"team":"core"}"#),
        ],
    );
    assert_eq!(code, 201, "{body}");
    let id = id_of(&serde_json::from_str(&body).unwrap());
    assert_eq!(
        body,
        format!("{{\"id\":\"{id}\",\"status\":\"created\"}}\n")
    );

    let (code, s) = m.get_json(&format!("/v1/vms/{id}"));
    assert_eq!(code, 200, "{s}");
    // The original's fields, plus mergen's state, supervisor and tags.
    assert_eq!(
        keys(&s),
        set(&[common::ORIGINAL_SUMMARY_FIELDS, &["tags"]].concat())
    );
    assert_eq!(
        keys(&s["systemd"]),
        set(&[
            "available",
            "unit",
            "active",
            "activeState",
            "subState",
            "mainPID"
        ])
    );
    assert_eq!(s["systemd"]["unit"], format!("mergen@{id}.service"));
    assert_eq!(
        keys(&s["firecracker"]),
        set(&["socketPath", "socketPresent"])
    );
    assert_eq!(
        keys(&s["network"]),
        set(&["guestIP", "ports", "tapName", "netns"])
    );
    assert_eq!(
        keys(&s["paths"]),
        set(&[
            "configDir",
            "vmConfigPath",
            "metaPath",
            "hooksPath",
            "envPath",
            "runDir",
            "socketPath",
            "lockPath",
            "dataDir",
            "logsDir"
        ])
    );
    let meta: Value =
        serde_json::from_str(&read(roots.config().join(&id).join("meta.json"))).unwrap();
    assert_eq!(s["createdAt"], meta["createdAt"]);
    assert_eq!(s["paths"], meta["paths"]);
    assert_eq!(s["network"]["ports"], meta["ports"]);
    assert_eq!(s["network"]["netns"], meta["netns"]);
    assert_eq!(s["network"]["tapName"], meta["tapName"]);
    assert_eq!(s["network"]["guestIP"], meta["guestIP"]);
    assert_eq!(s["metadata"], meta["metadata"]);
    assert_eq!(s["firecracker"]["socketPath"], meta["paths"]["socketPath"]);

    let (code, list) = m.get_json("/v1/vms");
    assert_eq!(code, 200);
    assert_eq!(keys(&list), set(&["items"]));
    assert_eq!(list["items"][0], s);

    // Errors are exactly {"error", "message"}.
    for (method, path, status, code_word) in [
        ("GET", "/v1/vms/not-a-uuid".to_string(), 400, "bad_request"),
        (
            "GET",
            "/v1/vms/00000000-0000-4000-8000-000000000000".to_string(),
            404,
            "not_found",
        ),
        (
            "DELETE",
            "/v1/vms/00000000-0000-4000-8000-000000000000".to_string(),
            404,
            "not_found",
        ),
    ] {
        let (code, body) = m.curl(method, &path, &[]);
        let e: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(code, status, "{method} {path}: {body}");
        assert_eq!(keys(&e), set(&["error", "message"]), "{body}");
        assert_eq!(e["error"], code_word);
    }

    let (code, body) = m.curl("DELETE", &format!("/v1/vms/{id}"), &[]);
    assert_eq!(code, 200);
    assert_eq!(
        body,
        format!("{{\"id\":\"{id}\",\"status\":\"deleted\"}}\n")
    );

    // A VM whose meta.json cannot be read is a 500 internal_error, not a 404.
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let meta = roots.config().join(&id).join("meta.json");
    std::fs::remove_file(&meta).unwrap();
    std::fs::create_dir(&meta).unwrap();
    let (code, body) = m.curl("GET", &format!("/v1/vms/{id}"), &[]);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 500, "{body}");
    assert_eq!(keys(&e), set(&["error", "message"]), "{body}");
    assert_eq!(e["error"], "internal_error");
}

#[test]
fn socket_present_follows_the_jailer_symlink() {
    let roots = Roots::new("sock");
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&roots.body());
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let present = || {
        let (code, s) = m.get_json(&format!("/v1/vms/{id}"));
        assert_eq!(code, 200, "{s}");
        s["firecracker"]["socketPresent"].as_bool().unwrap()
    };
    let socket_path = roots.run().join(&id).join("mergen.socket");
    assert!(!present());

    // Under the jailer the socket lives in the chroot; the run dir holds a symlink.
    let chroot = roots.dir.join("chroot");
    std::fs::create_dir_all(&chroot).unwrap();
    let real = chroot.join("firecracker.socket");
    let listener = UnixListener::bind(&real).unwrap();
    std::os::unix::fs::symlink(&real, &socket_path).unwrap();
    assert!(present(), "a symlink to a live socket is present");

    // A dangling link, or a link to something that is not a socket, is not.
    drop(listener);
    std::fs::remove_file(&real).unwrap();
    assert!(!present());
    std::fs::write(&real, b"not a socket").unwrap();
    assert!(!present());

    // A socket bound at the path itself is present too.
    std::fs::remove_file(&socket_path).unwrap();
    let _direct = UnixListener::bind(&socket_path).unwrap();
    assert!(present());
}

#[test]
fn create_rules_and_allocation_range() {
    let roots = Roots::new("rules");
    let m = Mergend::start(
        &roots,
        &[("MGR_PORT_START", "31000"), ("MGR_PORT_END", "31002")],
    );
    for (extra, needle) in [
        (r#","memMiB":127"#, "memMiB"),
        (r#","ports":[{"guest":65536}]"#, "ports[0].guest"),
        (r#","ports":[{"guest":80,"host":-1}]"#, "ports[0].host"),
        (
            r#","extraEnv":{"MGR_FIRECRACKER_BIN":"/x"}"#,
            "MGR_FIRECRACKER_BIN",
        ),
        (r#","extraEnv":{"LD_PRELOAD":"/x.so"}"#, "LD_PRELOAD"),
    ] {
        let body = roots.body_with(extra);
        let (code, v) = m.create(&body);
        assert_eq!(
            (code, v["error"].as_str()),
            (400, Some("bad_request")),
            "{body}: {v}"
        );
        assert!(
            v["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    assert!(roots.vm_dirs().is_empty(), "a rejected create wrote files");

    // memMiB 128 is the floor; protocol defaults to tcp; bindings come back sorted by
    // host port; host 0 takes the first free port of MGR_PORT_START..=MGR_PORT_END.
    let (code, v) = m.create(&roots.body_with(
        r#","memMiB":128,"ports":[{"guest":22,"host":31002},{"guest":80,"host":null},{"guest":443,"host":31001,"protocol":"udp"}]"#,
    ));
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let meta: Value =
        serde_json::from_str(&read(roots.config().join(&id).join("meta.json"))).unwrap();
    assert_eq!(
        meta["ports"],
        serde_json::json!([
            {"guest": 80, "host": 31000, "protocol": "tcp"},
            {"guest": 443, "host": 31001, "protocol": "udp"},
            {"guest": 22, "host": 31002, "protocol": "tcp"},
        ])
    );
    assert_eq!(meta["guestIP"], "172.30.0.2");

    // The range is used up: conflict. A port outside the range is refused (a
    // deliberate difference: the original published any port, host services included;
    // see api::published_ports_never_capture_host_services).
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":0}]"#));
    assert_eq!((code, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":31002}]"#));
    assert_eq!((code, v["error"].as_str()), (409, Some("conflict")), "{v}");
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"host":45000}]"#));
    assert_eq!(
        (code, v["error"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("MGR_ALLOW_PORTS_OUTSIDE_RANGE"));
}

/// `ports[].protocol` is trimmed and case-insensitive and stored lowercase; `vcpu` and
/// `memMiB`, when absent, are 1 and 512 (the original's README example).
#[test]
fn protocol_any_case_and_machine_defaults() {
    let roots = Roots::new("protocase");
    let m = Mergend::start(&roots, &[]);
    let (code, v) = m.create(&roots.body_with(
        r#","ports":[{"guest":80,"host":0,"protocol":" TCP "},{"guest":53,"host":0,"protocol":"Udp"}]"#,
    ));
    assert_eq!(code, 201, "{v}");
    let id = id_of(&v);
    let meta: Value =
        serde_json::from_str(&read(roots.config().join(&id).join("meta.json"))).unwrap();
    assert_eq!(meta["ports"][0]["protocol"], "tcp");
    assert_eq!(meta["ports"][1]["protocol"], "udp");
    let vm: Value = serde_json::from_str(&read(roots.config().join(&id).join("vm.json"))).unwrap();
    assert_eq!(vm["machine-config"]["vcpu_count"], 1);
    assert_eq!(vm["machine-config"]["mem_size_mib"], 512);
    let (code, v) = m.create(&roots.body_with(r#","ports":[{"guest":80,"protocol":"sctp"}]"#));
    assert_eq!(code, 400, "{v}");
}
