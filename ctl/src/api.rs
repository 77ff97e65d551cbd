//! The six `/v1/vms` operations with the original's semantics, over the store, the
//! allocator, the VM locks, the supervisor and the hooks.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use mergen_model::names::{is_valid_id, netns_name, tap_name};
use mergen_model::vmconfig::{with_ip_arg, MachineConfig, DEFAULT_BOOT_ARGS};
use mergen_model::{Hooks, Meta, VmConfig};
use mergen_runtime::{select_supervisor, RuntimeError, Supervisor, SystemdInfo, VmState};
use time::OffsetDateTime;

use crate::alloc::{allocate, Pool};
use crate::config::Config;
use crate::error::Error;
use crate::hooks::HookRunner;
use crate::hostports::{self, HostPorts};
use crate::index::Index;
use crate::lock::{FileLock, TryLock};
use crate::metrics::Metrics;
use crate::request::{parse_create, CreateRequest, Images};
use crate::store::{NewVm, Store};
use crate::summary::{self, Json, Rendered, StatusView, SupervisorView};
use mergen_cluster::{HostRecord, LocalVm, Publisher, VmRecord};

pub struct App {
    pub config: Config,
    pub store: Store,
    /// Every VM's meta.json, kept in step with the files: what creates allocate from
    /// and lists are answered from.
    index: Arc<Index>,
    /// Where images may come from, canonical (symlinks resolved at start-up).
    images: Images,
    supervisor: Result<Arc<dyn Supervisor>, RuntimeError>,
    pub hooks: HookRunner,
    pub metrics: Arc<Metrics>,
    /// This host's routes in etcd (`MGR_ETCD_ENDPOINTS`); `None` on a lone host.
    cluster: Option<Publisher>,
}

/// What a successful call produced; `crate::respond` turns it into a response.
pub enum Outcome {
    Healthy,
    /// Healthy, in a cluster whose etcd is in this state.
    HealthyIn(&'static str),
    Created(String),
    Started(String),
    Stopped(String),
    Deleted(String),
    /// A VM's summary.
    Vm(Json),
    /// `{"items": [summaries]}`.
    List(Json),
    /// `GET /v1/vms?scope=cluster`: every host's routes, as etcd has them.
    ClusterList(Vec<VmRecord>),
    Metrics(String),
}

impl App {
    pub fn new(config: Config) -> Result<App, String> {
        let store = Store::new(config.runtime.roots.clone());
        store
            .ensure_roots()
            .map_err(|e| format!("cannot create the state roots: {e}"))?;
        let index = {
            let _alloc = store
                .alloc_lock()
                .map_err(|e| format!("cannot take the allocation lock: {e}"))?;
            let scan_error = |e: std::io::Error| {
                format!("cannot scan {}: {e}", config.runtime.roots.config.display())
            };
            let rec = store.recover().map_err(scan_error)?;
            // After recovery, so that nothing half-written is read; under the lock, so
            // that no other mergend's create is half done either.
            let index = Arc::new(Index::load(&config.runtime.roots.config).map_err(scan_error)?);
            for p in &rec.removed {
                log::warn!(dir:? = p; "removed a half-written VM dir left by a crash");
            }
            for u in index.unlisted().map_err(scan_error)? {
                log::warn!(dir:? = u.dir, reason = u.why; "VM dir without a valid meta.json: not listed");
            }
            for p in &rec.stale {
                log::info!(path:? = p; "removed the lock or run dir of a VM that does not exist");
            }
            for (from, to) in &rec.orphaned {
                log::warn!(from:? = from, to:? = to; "data dir without a VM moved aside (never deleted): look at it, then remove it or move it back");
            }
            index
        };
        let canonical = |list: &[PathBuf], what: &str| -> Vec<PathBuf> {
            let mut out = Vec::new();
            for p in list {
                match fs::canonicalize(p) {
                    Ok(c) => out.push(c),
                    Err(e) => log::warn!(path:? = p, error:% = e; "{what} not usable"),
                }
            }
            out
        };
        let images = Images {
            roots: canonical(&config.image_roots, "image root"),
            devices: canonical(&config.image_devices, "image device"),
        };
        let supervisor = select_supervisor(&config.runtime);
        match &supervisor {
            Ok(s) => log::info!(kind:? = s.kind(); "supervisor ready"),
            Err(e) => log::warn!(error:% = e; "no supervisor: start and stop answer 503"),
        }
        let metrics = Arc::new(Metrics::default());
        let hooks = HookRunner::new(
            config.global_hooks_dir.clone(),
            config.hook_workers,
            Arc::clone(&metrics),
        );
        let cluster = match &config.cluster {
            Some(c) => Some(start_publisher(c, Arc::clone(&index))?),
            None => None,
        };
        Ok(App {
            config,
            store,
            index,
            images,
            supervisor,
            hooks,
            metrics,
            cluster,
        })
    }

    fn supervisor(&self) -> Result<&Arc<dyn Supervisor>, Error> {
        self.supervisor.as_ref().map_err(|e| {
            if e.is_unavailable() {
                Error::Unavailable(e.to_string())
            } else {
                Error::Internal(e.to_string())
            }
        })
    }

    /// What a VM looks like when no supervisor can be asked: nothing runs it, so it is
    /// reported stopped, with `systemd.available = false` and `supervisor.active = false`.
    fn unavailable_status(&self, meta: &Meta) -> StatusView {
        let systemd = SystemdInfo {
            available: false,
            unit: format!("{}@{}.service", self.config.runtime.unit_prefix, meta.id),
            ..SystemdInfo::default()
        };
        StatusView {
            state: VmState::Stopped,
            supervisor: SupervisorView::Unavailable {
                kind: "unavailable",
                active: false,
            },
            systemd,
        }
    }

    /// Status of many VMs with one supervisor query.
    fn statuses(&self, metas: &[&Meta]) -> Result<Vec<StatusView>, Error> {
        let sup = match &self.supervisor {
            Ok(s) => s,
            Err(_) => return Ok(metas.iter().map(|m| self.unavailable_status(m)).collect()),
        };
        match sup.status_all(metas) {
            Ok(list) if list.len() == metas.len() => {
                Ok(list.into_iter().map(StatusView::from).collect())
            }
            Ok(list) => Err(Error::Internal(format!(
                "supervisor returned {} statuses for {} VMs",
                list.len(),
                metas.len()
            ))),
            Err(RuntimeError::Unavailable(_)) => {
                Ok(metas.iter().map(|m| self.unavailable_status(m)).collect())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn check_id(id: &str) -> Result<(), Error> {
        if is_valid_id(id) {
            Ok(())
        } else {
            Err(Error::InvalidId(id.to_string()))
        }
    }

    /// The VM `id` of this host; for one of another host of the cluster, where it is.
    fn load(&self, id: &str) -> Result<Meta, Error> {
        Self::check_id(id)?;
        if let Some(meta) = self.store.load(id).map_err(Error::io("reading the VM"))? {
            return Ok(meta);
        }
        if let Some(cluster) = &self.cluster {
            match cluster.find(id) {
                Ok(Some(rec)) if rec.host != cluster.host().name => {
                    return Err(Error::Misdirected {
                        id: rec.id,
                        host: rec.host,
                        addr: rec.addr,
                    })
                }
                Ok(_) => {}
                // Not knowing where else it is, it is not here.
                Err(e) => log::debug!(id = id, error:% = e; "cannot ask etcd for the VM"),
            }
        }
        Err(Error::VmNotFound(id.to_string()))
    }

    /// Take the VM's lifecycle lock (409 when another call holds it) and re-read the
    /// VM under it, since a delete may have finished meanwhile.
    fn lock_existing(&self, id: &str) -> Result<(FileLock, Meta), Error> {
        let meta = self.load(id)?;
        let lock = match FileLock::try_acquire(meta.paths.lock_path.as_ref()) {
            Ok(TryLock::Acquired(l)) => l,
            Ok(TryLock::Held) => return Err(Error::Busy(id.to_string())),
            Err(e) => return Err(Error::io("VM lock")(e)),
        };
        let meta = self.load(id)?;
        Ok((lock, meta))
    }

    fn vm_hooks(&self, meta: &Meta) -> Option<Hooks> {
        match crate::hooks::read_hook_file(meta.paths.hooks_path.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                log::warn!(id = meta.id, error:% = e; "cannot read the VM's hooks.json");
                None
            }
        }
    }

    pub fn create(&self, body: &[u8]) -> Result<Outcome, Error> {
        let req = parse_create(body, &self.images)?;
        let mut ops = self.cluster.as_ref().map(Publisher::lock);
        let id = match &mut ops {
            Some(ops) => claim_new_id(ops, &req)?,
            None => uuid::Uuid::new_v4().to_string(),
        };
        let paths = self.store.roots().paths(&id);
        let lock_path = PathBuf::from(&paths.lock_path);
        let lock = match FileLock::try_acquire(&lock_path) {
            Ok(TryLock::Acquired(l)) => l,
            Ok(TryLock::Held) => return Err(Error::Busy(id)),
            Err(e) => return Err(Error::io("VM lock")(e)),
        };
        let written = self.write_new(&id, &req);
        let meta = match written {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_file(&lock_path);
                if let Some(ops) = &mut ops {
                    let _ = ops.withdraw(&id);
                }
                return Err(e);
            }
        };
        if let Some(mut ops) = ops {
            // The VM exists: a route that cannot be written now is written at the
            // next renewal of the lease.
            if let Err(e) = ops.publish(&local_vm(&meta)) {
                log::warn!(id = id, error:% = e; "route not published yet");
            }
        }
        log::info!(id = id, guest_ip:% = meta.guest_ip; "vm created");
        let hooks = (!req.hooks.is_empty()).then_some(&req.hooks);
        if let Err(e) = self.hooks.run("onCreate", &meta, hooks) {
            // A failed strict onCreate leaves no VM behind; removing the dir also
            // frees its IP and ports.
            let removed = self
                .store
                .alloc_lock()
                .and_then(|_alloc| self.store.remove(&meta, false));
            if let Err(re) = removed {
                log::error!(id = id, error:% = re; "cannot remove the VM after its onCreate hook failed");
            }
            self.withdraw(&id);
            let _ = fs::remove_file(&lock_path);
            log::warn!(id = id, error = e; "strict onCreate hook failed, VM removed");
            return Err(Error::HookFailed(format!("{e}; the VM was not created")));
        }
        if req.auto_start {
            self.start_locked(&meta)
                .map_err(|e| e.context(format!("VM {id} was created but not started")))?;
        }
        drop(lock);
        Ok(Outcome::Created(id))
    }

    /// Allocate and write the VM under the host-wide allocation lock.
    fn write_new(&self, id: &str, req: &CreateRequest) -> Result<Meta, Error> {
        let _alloc = self
            .store
            .alloc_lock()
            .map_err(Error::io("allocation lock"))?;
        let host = match req.ports.is_empty() {
            true => HostPorts::default(),
            false => hostports::read().map_err(Error::io("reading the host's sockets"))?,
        };
        let cidr = self.config.runtime.guest_cidr;
        let pool = Pool {
            cidr,
            ports: (self.config.port_start, self.config.port_end),
            allow_outside_range: self.config.allow_ports_outside_range,
        };
        let (guest_ip, ports) = self
            .index
            .allocate(|taken| allocate(&pool, taken, &host, &req.ports))
            .map_err(Error::Unreadable)??;
        let paths = self.store.roots().paths(id);
        let meta = Meta {
            id: id.to_string(),
            created_at: OffsetDateTime::now_utc(),
            rootfs: req.rootfs.clone(),
            kernel: req.kernel.clone(),
            data_disk: req.data_disk.clone(),
            ports,
            http_port: req.http_port,
            guest_ip,
            tap_name: tap_name(id),
            netns: netns_name(id),
            metadata: req.metadata.clone(),
            tags: req.tags.clone(),
            paths,
            hooks: req.hooks.clone(),
            process: req.process.clone(),
        };
        let vm_config = (!req.kernel.is_empty()).then(|| {
            let requested = req.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS);
            render_vm_config(&meta, req, with_ip_arg(requested, guest_ip, &cidr))
        });
        let vm = NewVm {
            env: render_env(&meta, &req.extra_env),
            vm_config,
            hooks: (!req.hooks.is_empty()).then(|| req.hooks.clone()),
            meta,
        };
        self.store
            .create(&vm)
            .map_err(Error::io("writing the VM"))?;
        Ok(vm.meta)
    }

    /// Start under the VM's lock (held by the caller); runs onStart hooks.
    fn start_locked(&self, meta: &Meta) -> Result<bool, Error> {
        let sup = self.supervisor()?;
        if sup.status(meta)?.state == VmState::Running {
            return Ok(false);
        }
        sup.start(meta)?;
        log::info!(id = meta.id; "vm started");
        if let Err(e) = self
            .hooks
            .run("onStart", meta, self.vm_hooks(meta).as_ref())
        {
            log::warn!(id = meta.id, error = e; "strict onStart hook failed, stopping the VM");
            if let Err(se) = sup.stop(meta) {
                log::error!(id = meta.id, error:% = se; "cannot stop the VM after its onStart hook failed");
            }
            return Err(Error::HookFailed(format!("{e}; the VM was stopped again")));
        }
        Ok(true)
    }

    pub fn start(&self, id: &str) -> Result<Outcome, Error> {
        let (_lock, meta) = self.lock_existing(id)?;
        self.start_locked(&meta)?;
        Ok(Outcome::Started(meta.id))
    }

    pub fn stop(&self, id: &str) -> Result<Outcome, Error> {
        let (_lock, meta) = self.lock_existing(id)?;
        let sup = self.supervisor()?;
        if sup.status(&meta)?.state == VmState::Stopped {
            return Ok(Outcome::Stopped(meta.id));
        }
        sup.stop(&meta)?;
        log::info!(id = id; "vm stopped");
        self.hooks
            .run("onStop", &meta, self.vm_hooks(&meta).as_ref())
            .map_err(|e| Error::HookFailed(format!("{e}; the VM is stopped")))?;
        Ok(Outcome::Stopped(meta.id))
    }

    pub fn delete(&self, id: &str, retain_data: bool) -> Result<Outcome, Error> {
        let (lock, meta) = self.lock_existing(id)?;
        match &self.supervisor {
            Ok(sup) => match sup.status(&meta) {
                Ok(st) if st.state == VmState::Stopped => {}
                Ok(_) => sup.stop(&meta)?,
                Err(RuntimeError::Unavailable(m)) => {
                    log::warn!(id = id, error:% = m; "supervisor unavailable, deleting without a stop")
                }
                Err(e) => return Err(e.into()),
            },
            Err(_) => log::debug!(id = id; "no supervisor, nothing to stop"),
        }
        let hooks = self.vm_hooks(&meta);
        self.hooks
            .run("onDelete", &meta, hooks.as_ref())
            .map_err(|e| Error::HookFailed(format!("{e}; the VM was not deleted")))?;
        self.store
            .alloc_lock()
            .and_then(|_alloc| self.store.remove(&meta, retain_data))
            .map_err(Error::io("removing the VM"))?;
        let _ = fs::remove_file(&meta.paths.lock_path);
        self.withdraw(id);
        drop(lock);
        log::info!(id = id, retain_data = retain_data; "vm deleted");
        Ok(Outcome::Deleted(meta.id))
    }

    pub fn get(&self, id: &str) -> Result<Outcome, Error> {
        let meta = self.load(id)?;
        let st = match &self.supervisor {
            Ok(sup) => match sup.status(&meta) {
                Ok(s) => StatusView::from(s),
                Err(RuntimeError::Unavailable(_)) => self.unavailable_status(&meta),
                Err(e) => return Err(e.into()),
            },
            Err(_) => self.unavailable_status(&meta),
        };
        let rendered = Rendered::new(&meta);
        let present = rendered.socket_present();
        Ok(Outcome::Vm(summary::one(&rendered, &st, present)))
    }

    /// Every VM, newest first, from the index; their states from one supervisor query
    /// per core (a list of thousands is file probes and serialising, spread over them).
    pub fn list(&self) -> Result<Outcome, Error> {
        let view = self.index.view().map_err(Error::io("listing VMs"))?;
        let stretches = mergen_watch::map_slices(&view, |vms| {
            let metas: Vec<&Meta> = vms.iter().map(|vm| &vm.meta).collect();
            let statuses = self.statuses(&metas)?;
            Ok(summary::items(vms.iter().zip(statuses).map(
                |(vm, status)| {
                    let rendered = vm.rendered();
                    (rendered, status, rendered.socket_present())
                },
            )))
        });
        let stretches = stretches.into_iter().collect::<Result<Vec<_>, Error>>()?;
        Ok(Outcome::List(summary::list(stretches)))
    }

    /// `GET /v1/vms?scope=cluster`: every VM of every host, from etcd.
    pub fn list_cluster(&self) -> Result<Outcome, Error> {
        let cluster = self.cluster.as_ref().ok_or_else(|| {
            Error::BadRequest(
                "scope=cluster: this host is in no cluster (MGR_ETCD_ENDPOINTS)".into(),
            )
        })?;
        let mut items = cluster.list()?;
        items.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(Outcome::ClusterList(items))
    }

    /// Take a deleted VM's route out of etcd (if this host is in a cluster); what
    /// cannot be removed now goes at the next renewal.
    fn withdraw(&self, id: &str) {
        if let Some(cluster) = &self.cluster {
            if let Err(e) = cluster.lock().withdraw(id) {
                log::warn!(id = id, error:% = e; "route not withdrawn yet");
            }
        }
    }

    /// The cluster part of `/healthz`, when this host is in one.
    pub fn cluster_health(&self) -> Option<&'static str> {
        let c = self.cluster.as_ref()?;
        Some(match c.status().connected() {
            true => "connected",
            false => "disconnected",
        })
    }

    pub fn metrics_text(&self) -> Result<Outcome, Error> {
        let view = self.index.view().map_err(Error::io("listing VMs"))?;
        let metas: Vec<&Meta> = view.iter().map(|vm| &vm.meta).collect();
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for s in self.statuses(&metas)? {
            let name = match s.state {
                VmState::Running => "running",
                VmState::Starting => "starting",
                VmState::Failed => "failed",
                VmState::Stopped => "stopped",
            };
            *by_state.entry(name).or_default() += 1;
        }
        let mut text = self.metrics.render(&by_state, &self.store.orphaned());
        if let Some(c) = &self.cluster {
            crate::metrics::render_cluster(&mut text, &c.status());
        }
        Ok(Outcome::Metrics(text))
    }
}

/// The publisher of this host's routes, whose full publishes read the index (in step
/// with the files, as a list is).
fn start_publisher(
    c: &crate::config::ClusterConfig,
    index: Arc<Index>,
) -> Result<Publisher, String> {
    let source: mergen_cluster::Source = Box::new(move || {
        let view = index.view().map_err(|e| e.to_string())?;
        Ok(view.iter().map(|vm| local_vm(&vm.meta)).collect())
    });
    let host = HostRecord {
        name: c.host_name.clone(),
        addr: c.host_addr.to_string(),
    };
    log::info!(host = c.host_name, addr:% = c.host_addr, endpoints:? = c.etcd.endpoints; "publishing this host's routes to etcd");
    Publisher::start(&c.etcd, host, c.lease_ttl, source).map_err(|e| e.to_string())
}

fn local_vm(meta: &Meta) -> LocalVm {
    LocalVm {
        id: meta.id.clone(),
        aliases: mergen_model::aliases(&meta.id, &meta.tags, &meta.metadata),
        created_at: meta.created_at,
    }
}

/// A new VM id whose aliases are claimed cluster-wide. The id's first 8 characters are
/// an alias too: on the rare clash with another host's VM, another id is drawn.
fn claim_new_id(ops: &mut mergen_cluster::Ops<'_>, req: &CreateRequest) -> Result<String, Error> {
    let mut tries = 0;
    loop {
        let id = uuid::Uuid::new_v4().to_string();
        let aliases = mergen_model::aliases(&id, &req.tags, &req.metadata);
        match ops.claim(&id, &aliases) {
            Ok(()) => return Ok(id),
            Err(mergen_cluster::ClusterError::AliasTaken { alias, .. })
                if tries < 3 && (alias == id || alias == mergen_model::names::short_id(&id)) =>
            {
                tries += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn render_vm_config(meta: &Meta, req: &CreateRequest, boot_args: String) -> VmConfig {
    let machine = MachineConfig {
        vcpu_count: req.vcpu,
        mem_size_mib: req.mem_mib,
        smt: false,
    };
    VmConfig::new(
        &meta.id,
        &req.kernel,
        boot_args,
        &req.rootfs,
        Some(&req.data_disk),
        machine,
    )
}

/// The systemd env file: `KEY='value'` lines sorted by key, `'` escaped as `'\''`.
/// As in the original, every key lives in one map: one `MGN_PUBLISH_<guest>` per
/// guest port (a later binding, in host-port order, replaces an earlier one on the
/// same guest port), `MGN_HTTP_PORT` when the VM has one (the later original), and
/// the request's extraEnv (blank keys skipped) is applied last.
pub fn render_env(meta: &Meta, extra: &BTreeMap<String, String>) -> String {
    let p = &meta.paths;
    let mut env: BTreeMap<String, String> = [
        ("MGN_VM_ID", meta.id.clone()),
        ("MGN_CONFIG_DIR", p.config_dir.clone()),
        ("MGN_VM_JSON", p.vm_config_path.clone()),
        ("MGN_META_JSON", p.meta_path.clone()),
        ("MGN_HOOKS_JSON", p.hooks_path.clone()),
        ("MGN_RUN_DIR", p.run_dir.clone()),
        ("MGN_SOCKET_PATH", p.socket_path.clone()),
        ("MGN_TAP_NAME", meta.tap_name.clone()),
        ("MGN_NETNS", meta.netns.clone()),
        ("MGN_GUEST_IP", meta.guest_ip.to_string()),
        ("MGN_DATA_DIR", p.data_dir.clone()),
        ("MGN_LOG_DIR", p.logs_dir.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for b in &meta.ports {
        env.insert(
            format!("MGN_PUBLISH_{}", b.guest),
            format!("{}/{}", b.host, b.protocol.as_str()),
        );
    }
    if meta.http_port != 0 {
        env.insert("MGN_HTTP_PORT".into(), meta.http_port.to_string());
    }
    for (k, v) in extra.iter().filter(|(k, _)| !k.trim().is_empty()) {
        env.insert(k.clone(), v.clone());
    }
    let mut out = String::new();
    for (k, v) in &env {
        out.push_str(k);
        out.push_str("='");
        out.push_str(&v.replace('\'', r"'\''"));
        out.push_str("'\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_model::{PortBinding, Protocol};
    use serde_json::json;

    const ID: &str = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn meta(ports: &[(u16, u16, Protocol)]) -> Meta {
        let ports = ports
            .iter()
            .map(|&(guest, host, protocol)| PortBinding {
                guest,
                host,
                protocol,
            })
            .collect();
        Meta {
            ports,
            ..crate::sample::meta(ID)
        }
    }

    fn request(data_disk: &str) -> CreateRequest {
        CreateRequest {
            rootfs: "/img/rootfs.ext4".into(),
            kernel: "/img/vmlinux".into(),
            data_disk: data_disk.into(),
            vcpu: 2,
            mem_mib: 256,
            ports: Vec::new(),
            http_port: 0,
            metadata: Default::default(),
            auto_start: false,
            boot_args: None,
            extra_env: BTreeMap::new(),
            tags: BTreeMap::new(),
            hooks: Hooks::new(),
            process: None,
        }
    }

    #[test]
    fn env_file_is_the_originals_exact_text() {
        let m = meta(&[
            (80, 20000, Protocol::Tcp),
            (53, 20001, Protocol::Udp),
            // Same guest port as the first: one key per guest port, the later wins.
            (80, 20002, Protocol::Udp),
        ]);
        let extra: BTreeMap<String, String> = [
            ("", "skipped"),
            ("APP_MODE", "it's"),
            ("ZED", "last"),
            ("MGN_GUEST_IP", "10.9.9.9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let want = "\
APP_MODE='it'\\''s'
MGN_CONFIG_DIR='/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6'
MGN_DATA_DIR='/var/lib/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6'
MGN_GUEST_IP='10.9.9.9'
MGN_HOOKS_JSON='/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/hooks.json'
MGN_LOG_DIR='/var/lib/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/logs'
MGN_META_JSON='/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/meta.json'
MGN_NETNS='mergen-084604f6'
MGN_PUBLISH_53='20001/udp'
MGN_PUBLISH_80='20002/udp'
MGN_RUN_DIR='/run/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6'
MGN_SOCKET_PATH='/run/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/mergen.socket'
MGN_TAP_NAME='tap-084604f6'
MGN_VM_ID='084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6'
MGN_VM_JSON='/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/vm.json'
ZED='last'
";
        assert_eq!(render_env(&m, &extra), want);
    }

    /// The later original exports the VM's HTTP port; none when it has none.
    #[test]
    fn env_file_carries_the_http_port_when_set() {
        let mut m = meta(&[]);
        assert!(!render_env(&m, &BTreeMap::new()).contains("MGN_HTTP_PORT"));
        m.http_port = 8080;
        let env = render_env(&m, &BTreeMap::new());
        assert!(
            env.contains("MGN_GUEST_IP='172.30.0.2'\nMGN_HOOKS_JSON='/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/hooks.json'\nMGN_HTTP_PORT='8080'\nMGN_LOG_DIR="),
            "sorted with the rest: {env}"
        );
    }

    #[test]
    fn vm_json_is_the_originals_exact_shape() {
        let m = meta(&[]);
        let c = render_vm_config(&m, &request(""), boot_args(None));
        let want = r#"{
  "boot-source": {
    "kernel_image_path": "/img/vmlinux",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off"
  },
  "drives": [
    {
      "drive_id": "rootfs",
      "path_on_host": "/img/rootfs.ext4",
      "is_root_device": true,
      "is_read_only": false
    }
  ],
  "machine-config": {
    "vcpu_count": 2,
    "mem_size_mib": 256,
    "smt": false
  },
  "network-interfaces": [
    {
      "iface_id": "eth0",
      "host_dev_name": "tap-084604f6",
      "guest_mac": "02:FC:08:46:04:01"
    }
  ]
}"#;
        assert_eq!(serde_json::to_string_pretty(&c).unwrap(), want);

        let c = render_vm_config(&m, &request("/img/data.ext4"), String::new());
        assert_eq!(
            serde_json::to_value(&c.drives).unwrap(),
            json!([
                {"drive_id": "rootfs", "path_on_host": "/img/rootfs.ext4", "is_root_device": true, "is_read_only": false},
                {"drive_id": "data", "path_on_host": "/img/data.ext4", "is_root_device": false, "is_read_only": false},
            ])
        );
    }

    /// The boot args a create with `requested` writes for guest 172.30.0.2 in the
    /// default network.
    fn boot_args(requested: Option<&str>) -> String {
        let cidr: mergen_model::Ipv4Cidr = "172.30.0.0/24".parse().unwrap();
        let requested = requested.unwrap_or(DEFAULT_BOOT_ARGS);
        with_ip_arg(requested, "172.30.0.2".parse().unwrap(), &cidr)
    }

    #[test]
    fn request_boot_args_replace_the_default_and_get_the_network() {
        let ip = "ip=172.30.0.2::172.30.0.1:255.255.255.0::eth0:off";
        assert_eq!(
            boot_args(Some("console=ttyS0 init=/init")),
            format!("console=ttyS0 init=/init {ip}")
        );
        // The request's own ip= is kept as it is, and nothing is added.
        assert_eq!(
            boot_args(Some("console=ttyS0 ip=dhcp")),
            "console=ttyS0 ip=dhcp"
        );
        assert_eq!(
            boot_args(None),
            format!("console=ttyS0 reboot=k panic=1 pci=off {ip}")
        );
    }
}
