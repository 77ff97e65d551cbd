//! The converter against real components: a registry (docker-registry with TLS, token
//! and basic auth), skopeo to push and to write a docker-archive, mkfs.ext4/debugfs,
//! and the converted rootfs booted by mergen-init in a PID namespace.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::registry::{Auth, Registry};
use common::*;
use mergen_testkit::{init_in_namespaces, require_root, wait_for, ChildGuard, TempDir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// No final output and no staging left in `dir` after a failed build.
fn assert_nothing_written(dir: &Path) {
    for name in mergen_image::OUTPUTS {
        assert!(
            !dir.join(name).exists(),
            "{name} left in {} after a failure",
            dir.display()
        );
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".mergen-image-work"),
                "staging {name} left behind"
            );
        }
    }
    let cache = dir.join("image-cache/blobs/sha256");
    if let Ok(entries) = fs::read_dir(&cache) {
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains("partial"),
                "partial blob {name} left in the cache"
            );
        }
    }
}

#[test]
fn registry_archive_and_layout_give_the_same_rootfs() {
    require_root!();
    if !require(
        "registry_archive_and_layout_give_the_same_rootfs",
        &[
            "docker-registry",
            "skopeo",
            "busybox",
            "debugfs",
            "mkfs.ext4",
        ],
    ) {
        return;
    }
    let tmp = TempDir::new("image-e2e");
    let layout = tmp.join("layout");
    write_layout(&layout, "v1", &fixture_layers(), CONFIG_MT);
    let reg = Registry::start(Auth::Token);
    let reference = format!("{}/test/img:v1", reg.host);
    reg.push(&format!("oci:{}:v1", s(&layout)), "test/img:v1", None);
    // skopeo cannot write zstd layers into a docker-archive; Docker's own format (the
    // legacy manifest.json with uncompressed layers) comes from the fixture.
    let archive = tmp.join("img.tar");
    write_docker_save(&archive, &reference, &fixture_layers());
    let (by_ref, by_archive, by_layout) = (tmp.join("ref"), tmp.join("archive"), tmp.join("oci"));
    let stdout = ok(&convert(&[
        "--image",
        &reference,
        "--output-dir",
        s(&by_ref),
        "--ca-file",
        s(&reg.ca),
    ]));
    assert!(stdout.contains("suggested httpPort: 8080"), "{stdout}");
    assert!(
        reg.token_requests.load(Ordering::SeqCst) > 0,
        "the pull never asked the token server"
    );
    ok(&convert(&[
        "--from-archive",
        s(&archive),
        "--image",
        &reference,
        "--output-dir",
        s(&by_archive),
    ]));
    ok(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--image",
        &reference,
        "--output-dir",
        s(&by_layout),
    ]));

    // The three trees, tars, metadata and ext4 images are the same.
    let tree = describe_tree(&by_ref.join("rootfs"));
    assert_eq!(
        tree,
        describe_tree(&by_archive.join("rootfs")),
        "registry vs docker-archive"
    );
    assert_eq!(
        tree,
        describe_tree(&by_layout.join("rootfs")),
        "registry vs OCI layout"
    );
    let tar = fs::read(by_ref.join("rootfs.tar")).unwrap();
    assert_eq!(tar, fs::read(by_archive.join("rootfs.tar")).unwrap());
    assert_eq!(tar, fs::read(by_layout.join("rootfs.tar")).unwrap());
    for dir in ["/", "/opaque", "/data", "/usr/share/doc", "/sbin", "/dev"] {
        let listing = debugfs(&by_ref.join("rootfs.ext4"), &format!("ls -l {dir}"));
        assert!(
            listing.lines().count() > 2,
            "debugfs ls -l {dir}: {listing}"
        );
        assert_eq!(
            listing,
            debugfs(&by_archive.join("rootfs.ext4"), &format!("ls -l {dir}")),
            "{dir}"
        );
        assert_eq!(
            listing,
            debugfs(&by_layout.join("rootfs.ext4"), &format!("ls -l {dir}")),
            "{dir}"
        );
    }
    assert_eq!(
        debugfs(&by_ref.join("rootfs.ext4"), "cat /data/x"),
        "second\n"
    );

    // What the layers said, applied.
    let root = by_ref.join("rootfs");
    assert!(!root.join("gone.txt").exists(), "whiteout not applied");
    let mut opaque: Vec<String> = fs::read_dir(root.join("opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opaque.sort();
    assert_eq!(opaque, ["c"], "opaque directory kept lower entries");
    let x = fs::metadata(root.join("data/x")).unwrap();
    assert_eq!(
        (x.mode() & 0o7777, x.uid(), x.gid(), x.mtime()),
        (0o600, 1000, 1000, MTIME as i64)
    );
    assert_eq!(fs::read(root.join("data/x")).unwrap(), b"second\n");
    assert_eq!(
        fs::read_link(root.join("data/link")).unwrap(),
        Path::new("x")
    );
    assert_eq!(
        fs::read_link(root.join("abs-link")).unwrap(),
        Path::new("/data/x")
    );
    let (one, two) = (
        fs::metadata(root.join("usr/share/doc/one")).unwrap(),
        fs::metadata(root.join("usr/share/doc/two")).unwrap(),
    );
    assert_eq!((one.ino(), one.nlink()), (two.ino(), 2), "hard link lost");
    let dev = fs::symlink_metadata(root.join("dev/mergen-null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &dev.file_type()
    ));
    assert_eq!(dev.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(
        fs::metadata(root.join("bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    let xattr =
        rustix::fs::lgetxattr(root.join("etc/labelled"), "user.mergen", &mut [0u8; 16]).unwrap();
    assert_eq!(xattr, 3);
    let (init, alias) = (
        fs::metadata(root.join("sbin/init")).unwrap(),
        fs::metadata(root.join("sbin/mergen-init")).unwrap(),
    );
    assert_eq!(init.ino(), alias.ino());
    assert_eq!(
        fs::read(root.join("sbin/init")).unwrap(),
        fs::read(static_init()).unwrap()
    );
    assert_eq!(
        fs::read(root.join("etc/mergen/image-meta.json")).unwrap(),
        fs::read(by_ref.join("image-meta.json")).unwrap()
    );

    // The tar: sorted, the hard link as a link entry, xattrs as PAX records.
    let mut archive_r = tar::Archive::new(&tar[..]);
    let mut names = Vec::new();
    let mut saw_link = false;
    for e in archive_r.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().into_owned();
        if e.header().entry_type() == tar::EntryType::Link {
            saw_link = true;
        }
        if p == Path::new("etc/labelled") {
            let exts: Vec<String> = e
                .pax_extensions()
                .unwrap()
                .unwrap()
                .map(|x| x.unwrap().key().unwrap().to_string())
                .collect();
            assert_eq!(exts, ["SCHILY.xattr.user.mergen"]);
        }
        names.push(p);
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "rootfs.tar is not in path order");
    assert!(saw_link, "no hard link entry in rootfs.tar");

    // Metadata and the suggestions.
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(by_ref.join("image-meta.json")).unwrap()).unwrap();
    assert_eq!(meta["image"], reference);
    assert_eq!(meta["createdAt"], CREATED);
    assert_eq!(meta["startCmd"][0], "/bin/sh");
    assert_eq!(meta["workingDir"], "/data");
    assert_eq!(meta["user"], "app");
    assert_eq!(
        meta["exposedPorts"],
        serde_json::json!(["53/udp", "8080/tcp", "9000/tcp"])
    );
    assert_eq!(meta["suggestedHTTPPort"], 8080);
    let req: serde_json::Value =
        serde_json::from_slice(&fs::read(by_ref.join("suggested-vm-request.json")).unwrap())
            .unwrap();
    assert_eq!(req["httpPort"], 8080);
    assert_eq!(
        req["rootfs"],
        by_ref
            .join("rootfs.ext4")
            .canonicalize()
            .unwrap()
            .to_str()
            .unwrap()
    );
    assert!(fs::read_to_string(by_ref.join("suggested-bootargs.txt"))
        .unwrap()
        .contains("init=/sbin/init"));

    // Reproducible: the same input again gives the same bytes.
    let again = tmp.join("again");
    ok(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--image",
        &reference,
        "--output-dir",
        s(&again),
    ]));
    assert_eq!(
        tar,
        fs::read(again.join("rootfs.tar")).unwrap(),
        "rootfs.tar is not reproducible"
    );

    // A missing image is a clear 404.
    let missing = tmp.join("missing");
    let err = fails(&convert(&[
        "--image",
        &format!("{}/test/nope:v1", reg.host),
        "--output-dir",
        s(&missing),
        "--ca-file",
        s(&reg.ca),
    ]));
    assert!(err.contains("not found"), "{err}");
    assert_nothing_written(&missing);

    // Trust is explicit: without the CA the registry's certificate is refused.
    let untrusted = tmp.join("untrusted");
    let err = fails(&convert(&[
        "--image",
        &reference,
        "--output-dir",
        s(&untrusted),
    ]));
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );

    // A tampered blob in the registry is refused, and nothing of it is kept.
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let d = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(d)).unwrap()).unwrap()
    };
    let zstd_layer = manifest["layers"][1]["digest"].as_str().unwrap();
    let stored = reg.blob_file(zstd_layer);
    let original = fs::read(&stored).unwrap();
    let mut evil = original.clone();
    let last = evil.len() - 1;
    evil[last] ^= 0xff;
    fs::write(&stored, &evil).unwrap();
    let tampered = tmp.join("tampered");
    let err = fails(&convert(&[
        "--image",
        &reference,
        "--output-dir",
        s(&tampered),
        "--ca-file",
        s(&reg.ca),
    ]));
    assert!(err.contains("digest mismatch"), "{err}");
    assert_nothing_written(&tampered);
    assert!(!tampered
        .join("image-cache/blobs")
        .join(zstd_layer.replace(':', "/"))
        .exists());
    fs::write(&stored, &original).unwrap();

    // Offline: with the registry gone, --skip-pull rebuilds from the cache alone.
    drop(reg);
    fs::remove_file(by_ref.join("rootfs.tar")).unwrap();
    ok(&convert(&[
        "--image",
        &reference,
        "--output-dir",
        s(&by_ref),
        "--skip-pull",
    ]));
    assert_eq!(tar, fs::read(by_ref.join("rootfs.tar")).unwrap());
    let err = fails(&convert(&[
        "--image",
        "127.0.0.1:1/other:v9",
        "--output-dir",
        s(&by_ref),
        "--skip-pull",
    ]));
    assert!(
        err.contains("not found") && err.contains("--skip-pull"),
        "{err}"
    );
    assert!(
        by_ref.join("rootfs.tar").exists(),
        "a failed build removed the previous outputs"
    );
}

#[test]
fn basic_auth_from_docker_config() {
    require_root!();
    if !require(
        "basic_auth_from_docker_config",
        &["docker-registry", "skopeo", "busybox", "htpasswd"],
    ) {
        return;
    }
    let tmp = TempDir::new("image-basic");
    let layout = tmp.join("layout");
    write_layout(&layout, "v1", &fixture_layers(), CONFIG_MT);
    let reg = Registry::start(Auth::Basic {
        user: "alice",
        password: "s3cret",
    });
    reg.push(
        &format!("oci:{}:v1", s(&layout)),
        "private/img:v1",
        Some("alice:s3cret"),
    );
    let reference = format!("{}/private/img:v1", reg.host);

    let docker_config = |dir: &Path, auth: Option<&str>| {
        fs::create_dir_all(dir).unwrap();
        let body = match auth {
            Some(a) => {
                use base64::Engine;
                let enc = base64::engine::general_purpose::STANDARD.encode(a);
                format!(
                    r#"{{"auths":{{"https://{}":{{"auth":"{enc}"}}}}}}"#,
                    reg.host
                )
            }
            None => "{}".into(),
        };
        fs::write(dir.join("config.json"), body).unwrap();
    };
    let run = |config: &Path, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_mergen-image"))
            .args([
                "build",
                "--quiet",
                "--image",
                &reference,
                "--output-dir",
                s(out),
            ])
            .env("MERGEN_INIT_BIN", static_init())
            .env("MERGEN_IMAGE_CA_FILE", &reg.ca)
            .env("DOCKER_CONFIG", config)
            .output()
            .unwrap()
    };
    let (good, none, wrong) = (
        tmp.join("cfg-good"),
        tmp.join("cfg-none"),
        tmp.join("cfg-wrong"),
    );
    docker_config(&good, Some("alice:s3cret"));
    docker_config(&none, None);
    docker_config(&wrong, Some("alice:nope"));
    let out = tmp.join("out");
    ok(&run(&good, &out));
    assert_eq!(fs::read(out.join("rootfs/data/x")).unwrap(), b"second\n");
    for (cfg, name) in [(&none, "none"), (&wrong, "wrong")] {
        let dir = tmp.join(format!("out-{name}"));
        let err = fails(&run(cfg, &dir));
        assert!(err.contains("authentication failed"), "{name}: {err}");
        assert_nothing_written(&dir);
    }
}

/// A layout whose second layer is `entries` (after the fixture's first layer).
fn hostile_layout(dir: &Path, entries: &[E]) {
    let mut layers = fixture_layers();
    layers.truncate(1);
    layers.push(Layer::gzip(layer_tar(entries)));
    write_layout(dir, "v1", &layers, CONFIG_MT);
}

#[test]
fn hostile_and_broken_inputs_are_refused() {
    if !require(
        "hostile_and_broken_inputs_are_refused",
        &["busybox", "mkfs.ext4"],
    ) {
        return;
    }
    let tmp = TempDir::new("image-refuse");
    let outside = tmp.join("outside");
    fs::create_dir_all(&outside).unwrap();
    let climb = format!(
        "{}{}",
        "../".repeat(20),
        s(&outside).trim_start_matches('/')
    );
    let cases: Vec<(&str, Vec<E>)> = vec![
        ("dotdot", vec![E::RawName("../evil")]),
        ("nested-dotdot", vec![E::RawName("data/../../evil")]),
        ("absolute", vec![E::RawName("/evil")]),
        (
            "symlink-parent",
            vec![E::Link("esc", &climb), E::File("esc/pwned", 0o644, b"x")],
        ),
        (
            "symlink-abs-then-up",
            vec![E::Link("up", "/.."), E::File("up/pwned", 0o644, b"x")],
        ),
        (
            "hardlink-out",
            vec![E::RawName("ok"), E::Hard("h", "../../etc/passwd")],
        ),
    ];
    for (name, entries) in cases {
        let layout = tmp.join(format!("layout-{name}"));
        hostile_layout(&layout, &entries);
        let out = tmp.join(format!("out-{name}"));
        let err = fails(&convert(&[
            "--from-oci-dir",
            s(&layout),
            "--output-dir",
            s(&out),
        ]));
        assert!(err.contains("refused layer entry"), "{name}: {err}");
        assert_nothing_written(&out);
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "{name} wrote outside the root"
        );
    }
    // `/..` is the root itself inside the guest: that symlink stays inside and is fine.
    let layout = tmp.join("layout-abs-inside");
    hostile_layout(
        &layout,
        &[
            E::Link("inside", "/data"),
            E::File("inside/ok", 0o644, b"ok"),
        ],
    );
    let out = tmp.join("out-abs-inside");
    ok(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&out),
    ]));
    assert_eq!(fs::read(out.join("rootfs/data/ok")).unwrap(), b"ok");

    // An unsupported layer compression and a non-image artifact.
    let layout = tmp.join("layout-bzip2");
    let mut layers = fixture_layers();
    layers[1].media_type = "application/vnd.oci.image.layer.v1.tar+bzip2".into();
    write_layout(&layout, "v1", &layers, CONFIG_MT);
    let err = fails(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&tmp.join("o-bz")),
    ]));
    assert!(
        err.contains("unsupported media type") && err.contains("bzip2"),
        "{err}"
    );
    let layout = tmp.join("layout-helm");
    write_layout(
        &layout,
        "v1",
        &fixture_layers(),
        "application/vnd.cncf.helm.config.v1+json",
    );
    let err = fails(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&tmp.join("o-helm")),
    ]));
    assert!(
        err.contains("unsupported media type") && err.contains("helm"),
        "{err}"
    );

    // A tampered layer blob in a layout, and a layer that does not match its diff_id.
    let layout = tmp.join("layout-tampered");
    let manifest = write_layout(&layout, "v1", &fixture_layers(), CONFIG_MT);
    let digest = manifest["layers"][0]["digest"].as_str().unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let out = tmp.join("o-tampered");
    let err = fails(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&out),
    ]));
    assert!(err.contains("digest mismatch"), "{err}");
    assert_nothing_written(&out);
    let archive = tmp.join("bad-diff.tar");
    let mut layers = fixture_layers();
    layers[1].tar = layer_tar(&[E::File("swapped", 0o644, b"not what the config says")]);
    let honest = fixture_layers();
    // The archive's config lists the honest diff_ids; its second layer is another.
    write_docker_save(&archive, "test/img:v1", &honest);
    let swapped = tmp.join("swapped.tar");
    {
        let mut src = tar::Archive::new(fs::File::open(&archive).unwrap());
        let mut b = tar::Builder::new(fs::File::create(&swapped).unwrap());
        for e in src.entries().unwrap() {
            let mut e = e.unwrap();
            let mut h = e.header().clone();
            let path = e.path().unwrap().into_owned();
            if path == Path::new("layer1/layer.tar") {
                h.set_size(layers[1].tar.len() as u64);
                b.append_data(&mut h, &path, &layers[1].tar[..]).unwrap();
            } else {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                b.append_data(&mut h, &path, &data[..]).unwrap();
            }
        }
        b.finish().unwrap();
    }
    let out = tmp.join("o-swapped");
    let err = fails(&convert(&[
        "--from-archive",
        s(&swapped),
        "--output-dir",
        s(&out),
    ]));
    assert!(
        err.contains("digest mismatch") && err.contains("diff_id"),
        "{err}"
    );
    assert_nothing_written(&out);
    // The honest archive converts (the legacy docker save format, uncompressed layers).
    ok(&convert(&[
        "--from-archive",
        s(&archive),
        "--output-dir",
        s(&tmp.join("o-honest")),
    ]));

    // Asking a layout for an image it does not hold.
    let err = fails(&convert(&[
        "--from-oci-dir",
        s(&tmp.join("layout-tampered")),
        "--image",
        "x/y:z",
        "--platform",
        "linux/arm64",
        "--output-dir",
        s(&tmp.join("o-plat")),
    ]));
    assert!(
        err.contains("not found") && err.contains("linux/arm64"),
        "{err}"
    );
}

#[test]
fn a_full_disk_is_reported_and_leaves_nothing() {
    require_root!();
    if !require(
        "a_full_disk_is_reported_and_leaves_nothing",
        &["busybox", "mkfs.ext4"],
    ) {
        return;
    }
    let tmp = TempDir::new("image-full");
    let layout = tmp.join("layout");
    write_layout(&layout, "v1", &fixture_layers(), CONFIG_MT);
    let small = tmp.join("small");
    fs::create_dir_all(&small).unwrap();
    // busybox alone is larger than this filesystem.
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&small);
    let out = small.join("out");
    let err = fails(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&out),
    ]));
    assert!(err.contains("no space left"), "{err}");
    assert_nothing_written(&out);
}

#[test]
fn converted_rootfs_runs_its_command_under_mergen_init() {
    require_root!();
    if !require(
        "converted_rootfs_runs_its_command_under_mergen_init",
        &["busybox", "mkfs.ext4", "unshare"],
    ) {
        return;
    }
    let tmp = TempDir::new("image-boot");
    let layout = tmp.join("layout");
    write_layout(&layout, "v1", &fixture_layers(), CONFIG_MT);
    let out = tmp.join("out");
    ok(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--output-dir",
        s(&out),
    ]));
    let root = out.join("rootfs");
    // Init as PID 1 of its own namespaces; guarded with a deadline: a hung or failed
    // boot fails and takes the namespace with it.
    let (out_file, err_file) = (tmp.join("boot.out"), tmp.join("boot.err"));
    let mut boot = ChildGuard::spawn(
        init_in_namespaces(&root, "")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_file).unwrap())
            .stderr(fs::File::create(&err_file).unwrap()),
    );
    let status = wait_for("the booted rootfs to exit", Duration::from_secs(30), || {
        boot.0.try_wait().unwrap()
    });
    let stdout = fs::read_to_string(&out_file).unwrap_or_default();
    let stderr = fs::read_to_string(&err_file).unwrap_or_default();
    assert_eq!(status.code(), Some(7), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("hello from /data as 1000:1000 groups"),
        "{stdout}\n{stderr}"
    );
    let groups = stdout.split("groups").nth(1).unwrap_or_default();
    assert!(
        groups.contains("1000") && groups.contains("33"),
        "supplementary groups: {stdout}"
    );
}

/// A layout holding one multi-platform image named `tag`: an image index listing an
/// arm64 and an amd64 image (in that order), each with a file `/arch` naming it.
fn write_multi_platform_layout(dir: &Path, tag: &str) {
    let index_mt = "application/vnd.oci.image.index.v1+json";
    let mut entries = Vec::new();
    for arch in ["arm64", "amd64"] {
        let text = format!("{arch}\n");
        let layers = [Layer::gzip(layer_tar(&[E::File(
            "arch",
            0o644,
            text.as_bytes(),
        )]))];
        let config = serde_json::json!({
            "created": CREATED, "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "ExposedPorts": {"8080/tcp": {}}}
        });
        mergen_testkit::oci::write_layout(dir, arch, &layers, CONFIG_MT, config);
        // write_layout's index names the image just written: keep its descriptor.
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let mut desc = index["manifests"][0].clone();
        desc.as_object_mut().unwrap().remove("annotations");
        desc["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
        entries.push(desc);
    }
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": index_mt, "manifests": entries
    }))
    .unwrap();
    let digest = sha(&nested);
    fs::write(
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        &nested,
    )
    .unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": index_mt, "digest": digest, "size": nested.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

/// A manifest list through the real registry: the platform asked for (linux/amd64 by
/// default) is the one converted, another platform is refused by name, and a
/// platform the list lacks is a clear error. Also what the flags and the progress
/// line promise: `--name` names the default output dir, `--size-mib` sizes the ext4,
/// and a pull without `--quiet` reports layers and bytes.
#[test]
fn a_manifest_list_is_resolved_to_the_platform_asked_for() {
    require_root!();
    if !require(
        "a_manifest_list_is_resolved_to_the_platform_asked_for",
        &["docker-registry", "skopeo", "mkfs.ext4"],
    ) {
        return;
    }
    let tmp = TempDir::new("image-multi");
    let layout = tmp.join("layout");
    write_multi_platform_layout(&layout, "v1");
    let reg = Registry::start(Auth::Token);
    reg.push(&format!("oci:{}:v1", s(&layout)), "multi/img:v1", None);
    let reference = format!("{}/multi/img:v1", reg.host);

    // The default platform, by --name into ./artifacts/converter/<name>, with progress.
    let run = Command::new(env!("CARGO_BIN_EXE_mergen-image"))
        .args(["build", "--image", &reference, "--name", "web"])
        .args(["--size-mib", "80", "--ca-file", s(&reg.ca)])
        .current_dir(tmp.path())
        .env("MERGEN_INIT_BIN", static_init())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("pulling") && stderr.contains("layers 1/1"),
        "no progress line: {stderr}"
    );
    let out = tmp.join("artifacts/converter/web");
    assert_eq!(fs::read(out.join("rootfs/arch")).unwrap(), b"amd64\n");
    assert_eq!(
        fs::metadata(out.join("rootfs.ext4")).unwrap().len(),
        80 << 20,
        "--size-mib 80"
    );
    // The same from the layout, no network.
    let from_layout = tmp.join("from-layout");
    ok(&convert(&[
        "--from-oci-dir",
        s(&layout),
        "--image",
        "v1",
        "--output-dir",
        s(&from_layout),
    ]));
    assert_eq!(
        fs::read(from_layout.join("rootfs/arch")).unwrap(),
        b"amd64\n"
    );

    // arm64 is in the list and is the image chosen: our x86-64 init cannot boot it.
    let arm = tmp.join("arm");
    let err = fails(&convert(&[
        "--image",
        &reference,
        "--platform",
        "linux/arm64",
        "--output-dir",
        s(&arm),
        "--ca-file",
        s(&reg.ca),
    ]));
    assert!(err.contains("the image is arm64"), "{err}");
    assert_nothing_written(&arm);
    let s390 = tmp.join("s390x");
    let err = fails(&convert(&[
        "--image",
        &reference,
        "--platform",
        "linux/s390x",
        "--output-dir",
        s(&s390),
        "--ca-file",
        s(&reg.ca),
    ]));
    assert!(
        err.contains("no image for platform linux/s390x")
            && err.contains("linux/arm64")
            && err.contains("linux/amd64"),
        "{err}"
    );
    assert_nothing_written(&s390);
}
