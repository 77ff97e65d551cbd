//! `mergen-bench ctl`: mergend (and the forwarder reading its store) at scale, on temp
//! roots, against baselines taken in the same run:
//! - create latency (`POST /v1/vms`, p50/p99) with a few VMs and with `--vms` VMs, and
//!   their ratio; next to it one durable atomic file write (temp, fsync, rename, dir
//!   fsync), since a create is several of those plus the allocation lock. Each timed
//!   create is deleted again, so the count stays put;
//! - `GET /v1/vms` with all VMs vs reading their meta.json files raw; the first call
//!   after the copies are written (mergend catching up with them) on its own row;
//! - healthz requests/s from 50 keep-alive clients vs a raw TCP echo server;
//! - mergend start-up (process spawned → /healthz answers) with a few and with all VMs;
//! - the forwarder's cold load (spawned → a VM's name routed) with a few and with all;
//! - routing changes with all VMs: from a VM's files committed (a new VM, a changed
//!   alias, a removed VM) to the forwarder routing (or refusing) its name.
//!
//! Creates and lists also report mergend's CPU time per operation (user + system from
//! /proc, summed over the timed requests only): the figure that holds still on a shared
//! machine.
//!
//! The VMs beyond the first few are copies of one mergend created, written beside it
//! (see `disk`): creating 10,000 through the API takes too long while create grows with
//! the VM count, which is what this benchmark is here to show.

mod api;
mod disk;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mergen_model::Roots;
use serde_json::json;

use crate::interrupt;
use api::{Client, Daemon, EchoServer, CLIENTS, HEALTHZ};
use disk::{Replica, Template};

const MAX_VMS: usize = 30_000;
const LIST_ROUNDS: usize = 15;
const USAGE: &str = "usage: mergen-bench ctl [--vms N] [--small N] [--creates N] [--restarts N] \
[--changes N] [--ports N] [--seconds S] [--mergend PATH] [--forwarder PATH] [--json PATH]";

struct Options {
    vms: usize,
    small: usize,
    creates: usize,
    restarts: usize,
    changes: usize,
    /// Host ports each created VM asks for. With none, a create skips reading the
    /// host's socket tables, whose cost follows every socket on the machine (TIME_WAIT
    /// ones included), not the VM count.
    ports: usize,
    seconds: u64,
    mergend: PathBuf,
    /// Without a forwarder binary the forwarder rows are skipped.
    forwarder: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut o = Options {
        vms: 10_000,
        small: 10,
        creates: 100,
        restarts: 5,
        changes: 20,
        ports: 1,
        seconds: 2,
        mergend: exe.with_file_name("mergend"),
        forwarder: Some(exe.with_file_name("mergen-forwarder")),
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let val = it
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?;
        let num = || {
            val.parse::<usize>()
                .map_err(|_| format!("{a}: {val:?} is not a number"))
        };
        match a.as_str() {
            "--vms" => o.vms = num()?,
            "--small" => o.small = num()?,
            "--creates" => o.creates = num()?,
            "--restarts" => o.restarts = num()?,
            "--changes" => o.changes = num()?,
            "--ports" => o.ports = num()?,
            "--seconds" => o.seconds = num()? as u64,
            "--mergend" => o.mergend = val.into(),
            "--forwarder" => o.forwarder = Some(val.into()),
            "--json" => o.json = Some(val.into()),
            _ => return Err(USAGE.into()),
        }
    }
    if o.small == 0 || o.small >= o.vms || o.vms > MAX_VMS {
        return Err(format!("want 0 < --small < --vms <= {MAX_VMS}"));
    }
    if o.ports > 16 {
        return Err("--ports must be 0..16".into());
    }
    if o.creates == 0 || o.restarts == 0 || o.changes == 0 {
        return Err("--creates, --restarts and --changes must be at least 1".into());
    }
    if !(1..=30).contains(&o.seconds) {
        return Err("--seconds must be 1..30".into());
    }
    if !o.mergend.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build --release -p mergen-ctl) or pass --mergend",
            o.mergend.display()
        ));
    }
    if o.forwarder.as_ref().is_some_and(|f| !f.exists()) {
        println!("(no forwarder binary: skipping the forwarder rows; build mergen-dataplane)");
        o.forwarder = None;
    }
    Ok(o)
}

/// The figures of one run, in the order they are printed.
#[derive(Default)]
struct Report {
    rows: Vec<Row>,
}

struct Row {
    measure: String,
    samples: Vec<Duration>,
    /// mergend's CPU time per operation over the timed operations, where measured.
    cpu: Option<Duration>,
    /// A comparison with a baseline or the smaller store, already worded.
    note: String,
    /// The bound issue 10 sets, and the figure it applies to.
    target: Option<(Stat, Duration)>,
}

#[derive(Clone, Copy)]
enum Stat {
    P99,
    Max,
}

impl Report {
    fn add(&mut self, measure: impl Into<String>, samples: &[Duration], note: String) {
        self.rows.push(Row {
            measure: measure.into(),
            samples: samples.to_vec(),
            cpu: None,
            note,
            target: None,
        });
    }

    /// The CPU time per operation of the row added last.
    fn cpu(&mut self, per_op: Duration) {
        if let Some(r) = self.rows.last_mut() {
            r.cpu = Some(per_op);
        }
    }

    fn target(&mut self, stat: Stat, bound: Duration) {
        if let Some(r) = self.rows.last_mut() {
            r.target = Some((stat, bound));
        }
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    interrupt::install()?;
    let dir = mergen_testkit::TempDir::new("bench-ctl");
    let root = dir.path();
    for d in ["config", "data", "run", "img", "hooks.d"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    std::fs::write(root.join("img/vmlinux"), b"k").map_err(|e| e.to_string())?;
    std::fs::write(root.join("img/rootfs.ext4"), b"r").map_err(|e| e.to_string())?;
    let roots = Roots {
        config: root.join("config"),
        data: root.join("data"),
        run: root.join("run"),
    };
    let certs = crate::certs::Certs::make(root)?;
    let addr: SocketAddr = ([127, 0, 0, 1], mergen_testkit::free_port()).into();
    let ports: Vec<_> = (0..o.ports)
        .map(|i| json!({"guest": 80 + i, "host": 0}))
        .collect();
    let body = json!({
        "rootfs": format!("{}/img/rootfs.ext4", root.display()),
        "kernel": format!("{}/img/vmlinux", root.display()),
        "ports": ports,
    })
    .to_string();
    let mut report = Report::default();
    let started_at = time::OffsetDateTime::now_utc();

    // A few VMs through the API.
    let mut daemon = Some(Daemon::start(&o.mergend, root, addr)?);
    let mut client = Client::connect(addr)?;
    let mut newest = String::new();
    for _ in 0..o.small {
        newest = create(&mut client, &body)?;
    }
    let (mut create_small, fsync_small, cpu_create_small) =
        timed_creates(&mut client, daemon.as_ref(), &body, o.creates, root)?;
    drop(client);
    let startup_small = restarts(&mut daemon, &o, root, addr)?;
    let sni_small = format!("{}.localhost", mergen_model::names::short_id(&newest));
    let cold_small = match &o.forwarder {
        Some(f) => Some(cold_loads(
            f,
            root,
            &certs.ecdsa,
            &roots,
            &sni_small,
            o.restarts,
        )?),
        None => None,
    };

    // The rest as copies of the newest, written beside mergend.
    println!("writing {} more VMs …", o.vms - o.small);
    let template = Template::read(&roots.config, &newest)?;
    let salt = std::process::id();
    let t = Instant::now();
    let now = time::OffsetDateTime::now_utc();
    for n in 0..(o.vms - o.small) as u32 {
        if n % 1000 == 0 {
            interrupt::check()?;
        }
        template.write(&roots, &Replica::nth(n, salt), now)?;
    }
    let populate = t.elapsed();
    let last = Replica::nth((o.vms - o.small - 1) as u32, salt);
    let sni_all = format!("{}.localhost", last.short_id());

    let mut client = Client::connect(addr)?;
    // The first call after the copies were written catches up with them (mergend's
    // index reads them; a mergend without one reads everything every time anyway):
    // timed on its own, so that the creates below show the steady state.
    let t = Instant::now();
    let (code, _) = client.request("GET", "/v1/vms", b"")?;
    if code != 200 {
        return Err(format!("list answered {code}"));
    }
    let catch_up = t.elapsed();
    let (mut create_all, fsync_all, cpu_create_all) =
        timed_creates(&mut client, daemon.as_ref(), &body, o.creates, root)?;
    let (list, raw, cpu_list) = lists(&mut client, daemon.as_ref(), &roots, o.vms)?;
    drop(client);
    let limit = Duration::from_secs(o.seconds);
    let echo = EchoServer::start()?;
    let echo_rps = api::hammer(echo.addr, limit, HEALTHZ.len())?;
    let healthz_rps = api::hammer(addr, limit, 0)?;
    let startup_all = restarts(&mut daemon, &o, root, addr)?;
    drop(daemon);

    let (n, s) = (o.vms, o.small);
    let mut fsync = fsync_small;
    fsync.extend(fsync_all);
    let (c50s, c99s) = (pct(&mut create_small, 50), pct(&mut create_small, 99));
    let (c50a, c99a) = (pct(&mut create_all, 50), pct(&mut create_all, 99));
    report.add(format!("create, {s} VMs"), &create_small, String::new());
    report.cpu(cpu_create_small);
    report.add(
        format!("create, {n} VMs"),
        &create_all,
        format!(
            "{:.2}× ({:.2}× at p99) the create with {s} VMs",
            ratio(c50a, c50s),
            ratio(c99a, c99s)
        ),
    );
    report.cpu(cpu_create_all);
    report.target(Stat::P99, c99s * 2);
    let f50 = median(&fsync);
    report.add(
        "baseline: one durable atomic write",
        &fsync,
        format!("create with {n} VMs: {:.1}× at p50", ratio(c50a, f50)),
    );
    report.add(
        format!("GET /v1/vms, {n} VMs"),
        &list,
        format!(
            "{:.1}× reading the meta.json files raw",
            ratio(median(&list), median(&raw))
        ),
    );
    report.cpu(cpu_list);
    report.target(Stat::P99, Duration::from_millis(100));
    report.add(format!("baseline: read {n} meta.json"), &raw, String::new());
    report.add(
        format!("first list after {} VMs written beside mergend", n - s),
        &[catch_up],
        "mergend catching up; the creates and lists above come after it".into(),
    );
    report.add(
        format!("mergend start-up, {s} VMs (spawn → /healthz)"),
        &startup_small,
        String::new(),
    );
    report.add(
        format!("mergend start-up, {n} VMs"),
        &startup_all,
        format!(
            "{:.1}× with {s} VMs",
            ratio(median(&startup_all), median(&startup_small))
        ),
    );
    report.target(Stat::Max, Duration::from_secs(1));

    let mut changes_json = json!(null);
    if let (Some(fwd), Some(cold_small)) = (&o.forwarder, &cold_small) {
        let cold_all = cold_loads(fwd, root, &certs.ecdsa, &roots, &sni_all, o.restarts)?;
        report.add(
            format!("forwarder cold load, {s} VMs (spawn → routed)"),
            cold_small,
            String::new(),
        );
        report.add(
            format!("forwarder cold load, {n} VMs"),
            &cold_all,
            format!(
                "{:.1}× with {s} VMs",
                ratio(median(&cold_all), median(cold_small))
            ),
        );
        report.target(Stat::Max, Duration::from_millis(200));
        let ch = route_changes(fwd, root, &certs.ecdsa, &roots, &template, &o, salt)?;
        for (what, samples) in [
            ("new VM", &ch.added),
            ("alias changed", &ch.renamed),
            ("VM removed", &ch.removed),
        ] {
            report.add(
                format!("route change, {n} VMs: {what} (written → seen)"),
                samples,
                String::new(),
            );
            report.target(Stat::Max, Duration::from_millis(100));
        }
        changes_json = json!({ "samples": o.changes });
    }

    println!(
        "\nmergend control plane: {n} VMs ({} written beside mergend in {:.1} s), \
         {} timed creates per size ({} host ports each), {} restarts",
        n - s,
        populate.as_secs_f64(),
        o.creates,
        o.ports,
        o.restarts
    );
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>10}  {:<16} note",
        "measure", "p50", "p99", "max", "CPU/op", "issue 10 target"
    );
    for r in &report.rows {
        let mut v = r.samples.clone();
        let (p50, p99, max) = (pct(&mut v, 50), pct(&mut v, 99), pct(&mut v, 100));
        let target = r.target.map_or(String::new(), |(stat, bound)| {
            let (name, got) = match stat {
                Stat::P99 => ("p99", p99),
                Stat::Max => ("max", max),
            };
            let verdict = if got <= bound { "met" } else { "MISSED" };
            format!("{name} ≤ {} {verdict}", ms(bound))
        });
        println!(
            "{:<58} {:>10} {:>10} {:>10} {:>10}  {target:<16} {}",
            r.measure,
            ms(p50),
            ms(p99),
            ms(max),
            r.cpu.map_or(String::new(), ms),
            r.note
        );
    }
    println!(
        "{:<58} {:>10.0} req/s  {:.2}× a raw TCP echo ({echo_rps:.0} req/s), {CLIENTS} clients",
        "healthz, keep-alive",
        healthz_rps,
        healthz_rps / echo_rps.max(1.0)
    );

    if let Some(path) = &o.json {
        let rows: Vec<_> = report
            .rows
            .iter()
            .map(|r| {
                let mut v = r.samples.clone();
                json!({
                    "measure": r.measure,
                    "p50_ms": pct(&mut v, 50).as_secs_f64() * 1e3,
                    "p99_ms": pct(&mut v, 99).as_secs_f64() * 1e3,
                    "max_ms": pct(&mut v, 100).as_secs_f64() * 1e3,
                    "samples": v.len(),
                    "cpu_per_op_ms": r.cpu.map(|c| c.as_secs_f64() * 1e3),
                    "note": r.note,
                    "target_ms": r.target.map(|(_, b)| b.as_secs_f64() * 1e3),
                    "target_stat": r.target.map(|(stat, _)| match stat {
                        Stat::P99 => "p99",
                        Stat::Max => "max",
                    }),
                })
            })
            .collect();
        let doc = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "started": started_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "vms": n, "small": s, "creates": o.creates, "restarts": o.restarts, "ports": o.ports,
            "populate_seconds": populate.as_secs_f64(),
            "healthz_rps": healthz_rps, "echo_rps": echo_rps,
            "route_changes": changes_json,
            "rows": rows,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// POST one VM; its id.
fn create(client: &mut Client, body: &str) -> Result<String, String> {
    let (code, resp) = client.request("POST", "/v1/vms", body.as_bytes())?;
    if code != 201 {
        return Err(format!(
            "create answered {code}: {}",
            String::from_utf8_lossy(&resp)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&resp).map_err(|e| e.to_string())?;
    v["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no id in {v}"))
}

/// `count` creates, each timed and then deleted again (untimed), interleaved with the
/// durable-write baseline; and mergend's CPU time per create (over the creates only).
fn timed_creates(
    client: &mut Client,
    daemon: Option<&Daemon>,
    body: &str,
    count: usize,
    root: &std::path::Path,
) -> Result<(Vec<Duration>, Vec<Duration>, Duration), String> {
    let daemon = daemon.ok_or("mergend is not running")?;
    let mut create_t = Vec::with_capacity(count);
    let mut fsync_t = Vec::with_capacity(count);
    let mut cpu = Duration::ZERO;
    let scratch = root.join("scratch.json");
    for _ in 0..count {
        interrupt::check()?;
        let before = daemon.cpu();
        let t = Instant::now();
        let id = create(client, body)?;
        create_t.push(t.elapsed());
        cpu += daemon.cpu().saturating_sub(before);
        let (code, resp) = client.request("DELETE", &format!("/v1/vms/{id}"), b"")?;
        if code != 200 {
            return Err(format!(
                "delete answered {code}: {}",
                String::from_utf8_lossy(&resp)
            ));
        }
        let t = Instant::now();
        mergen_model::atomic::write_file(&scratch, &[b'x'; 1200], 0o644)
            .map_err(|e| e.to_string())?;
        fsync_t.push(t.elapsed());
    }
    Ok((create_t, fsync_t, cpu / count as u32))
}

/// `GET /v1/vms` with every VM, interleaved with reading their meta.json files; and
/// mergend's CPU time per list.
fn lists(
    client: &mut Client,
    daemon: Option<&Daemon>,
    roots: &Roots,
    vms: usize,
) -> Result<(Vec<Duration>, Vec<Duration>, Duration), String> {
    let daemon = daemon.ok_or("mergend is not running")?;
    let mut list = Vec::new();
    let mut raw = Vec::new();
    let mut cpu = Duration::ZERO;
    for _ in 0..LIST_ROUNDS {
        interrupt::check()?;
        let before = daemon.cpu();
        let t = Instant::now();
        let (code, resp) = client.request("GET", "/v1/vms", b"")?;
        list.push(t.elapsed());
        cpu += daemon.cpu().saturating_sub(before);
        if code != 200 {
            return Err(format!("list answered {code}"));
        }
        let items = String::from_utf8_lossy(&resp)
            .matches("\"createdAt\"")
            .count();
        if items != vms {
            return Err(format!("list returned {items} VMs, want {vms}"));
        }
        let t = Instant::now();
        let n = disk::read_metas(&roots.config)?;
        raw.push(t.elapsed());
        if n != vms {
            return Err(format!("found {n} meta.json files, want {vms}"));
        }
    }
    Ok((list, raw, cpu / LIST_ROUNDS as u32))
}

/// Stop mergend and start it again `--restarts` times; each start-up time.
fn restarts(
    daemon: &mut Option<Daemon>,
    o: &Options,
    root: &std::path::Path,
    addr: SocketAddr,
) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(o.restarts);
    for _ in 0..o.restarts {
        drop(daemon.take());
        let d = Daemon::start(&o.mergend, root, addr)?;
        times.push(d.startup);
        *daemon = Some(d);
    }
    Ok(times)
}

/// Start the forwarder on the store `restarts` times; from spawning it to `sni` routed.
fn cold_loads(
    bin: &std::path::Path,
    root: &std::path::Path,
    cert: &crate::certs::CertFiles,
    roots: &Roots,
    sni: &str,
    restarts: usize,
) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(restarts);
    for _ in 0..restarts {
        let port = mergen_testkit::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let t = Instant::now();
        let fwd = routes::start_forwarder(bin, root, cert, &roots.config, port)?;
        times.push(routes::wait_until(addr, sni, true, t)?);
        drop(fwd);
    }
    Ok(times)
}

struct Changes {
    added: Vec<Duration>,
    renamed: Vec<Duration>,
    removed: Vec<Duration>,
}

/// With the forwarder running on the full store: how long after a VM's files are
/// committed its name routes (new VM, new alias) or is refused (VM removed).
fn route_changes(
    bin: &std::path::Path,
    root: &std::path::Path,
    cert: &crate::certs::CertFiles,
    roots: &Roots,
    template: &Template,
    o: &Options,
    salt: u32,
) -> Result<Changes, String> {
    let port = mergen_testkit::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let _fwd = routes::start_forwarder(bin, root, cert, &roots.config, port)?;
    let first = Replica::nth(0, salt);
    routes::wait_until(
        addr,
        &format!("{}.localhost", first.short_id()),
        true,
        Instant::now(),
    )?;
    let mut out = Changes {
        added: Vec::new(),
        renamed: Vec::new(),
        removed: Vec::new(),
    };
    let base = (o.vms - o.small) as u32;
    for k in 0..o.changes as u32 {
        // A new VM, committed by rename like a create.
        let vm = Replica::nth(base + k, salt);
        let sni = format!("{}.localhost", vm.short_id());
        template.write(roots, &vm, time::OffsetDateTime::now_utc())?;
        out.added
            .push(routes::wait_until(addr, &sni, true, Instant::now())?);

        // An existing VM's meta.json replaced with a new alias.
        let existing = Replica::nth(k, salt);
        let path = roots.config.join(&existing.id).join("meta.json");
        let mut meta =
            mergen_model::Meta::from_slice(&std::fs::read(&path).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        let alias = format!("renamed{k}-{salt}");
        meta.tags.insert("app".into(), alias.clone());
        mergen_model::atomic::write_json(&path, &meta).map_err(|e| e.to_string())?;
        out.renamed.push(routes::wait_until(
            addr,
            &format!("{alias}.localhost"),
            true,
            Instant::now(),
        )?);

        // The new VM removed again.
        disk::remove(roots, &vm.id)?;
        out.removed
            .push(routes::wait_until(addr, &sni, false, Instant::now())?);
    }
    Ok(out)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Nearest-rank percentile; 100 is the maximum.
fn pct(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let rank = (v.len() * p).div_ceil(100).clamp(1, v.len());
    v[rank - 1]
}

fn median(v: &[Duration]) -> Duration {
    pct(&mut v.to_vec(), 50)
}
