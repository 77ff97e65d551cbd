//! The routing table: every `$FWD_CONFIG_ROOT/*/meta.json`, turned into an immutable
//! [`Snapshot`] that the data path reads without locks. A rescan builds a new snapshot
//! aside and swaps it in; inotify makes a VM's arrival or departure visible within
//! milliseconds, and a periodic full rescan covers anything inotify missed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use inotify::{EventMask, EventOwned, Inotify, WatchDescriptor, WatchMask, Watches};
use mergen_model::RouteMeta;
use mergen_watch::{is_candidate, read_changed, Read, Stamp, VmDirs};
use time::OffsetDateTime;

use crate::watch::{self, Wake};

pub use mergen_watch::META_FILE;

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub id: String,
    pub guest_ip: Ipv4Addr,
    /// Where the guest's sockets are made, resolved once when the route was loaded.
    pub netns: Namespace,
    pub created_at: OffsetDateTime,
    /// `httpPort` (the later original): where `https` listeners dial this VM instead
    /// of their own guest port.
    pub http_port: Option<u16>,
}

/// A VM's network namespace as the data path dials into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// meta.json names none: the guest is reached from the host's own namespace (a
    /// process VM, a benchmark backend).
    Host,
    /// The namespace's file. The path is also the key of its socket pool, so dials and
    /// prewarming cannot disagree on it.
    File(Arc<str>),
    /// A name that cannot be a namespace (`..`, `a/b`): every dial to it fails.
    Invalid(String),
}

impl Namespace {
    /// `netns` as written in meta.json: an absolute path is taken as is; a name is the
    /// first existing of `<netns_root>/<name>`, `/run/netns/<name>`,
    /// `/var/run/netns/<name>`. A name found nowhere yet (the VM's namespace is made
    /// when it starts) is where `ip netns add` will put it: the first candidate.
    pub fn resolve(netns_root: Option<&Path>, netns: &str) -> Namespace {
        Self::resolve_with(netns_root, netns, |p| p.exists())
    }

    /// [`Namespace::resolve`], asking `exists` whether a candidate file exists.
    fn resolve_with(
        netns_root: Option<&Path>,
        netns: &str,
        exists: impl Fn(&Path) -> bool,
    ) -> Namespace {
        if netns.is_empty() {
            return Namespace::Host;
        }
        let p = Path::new(netns);
        if p.is_absolute() {
            return Namespace::File(Arc::from(netns));
        }
        if netns.contains('/') || netns == "." || netns == ".." {
            return Namespace::Invalid(netns.to_string());
        }
        let mut candidates = netns_root
            .into_iter()
            .chain([Path::new("/run/netns"), Path::new("/var/run/netns")])
            .map(|root| root.join(netns));
        let first = candidates.next();
        let found = first
            .iter()
            .cloned()
            .chain(candidates)
            .find(|c| exists(c))
            .or(first);
        match found {
            Some(path) => Namespace::File(Arc::from(path.to_string_lossy().as_ref())),
            None => Namespace::Invalid(netns.to_string()),
        }
    }
}

/// Which namespace a namespace file names: the device and inode of the nsfs file bound
/// there. It changes when the namespace is deleted (no file) or replaced by another.
pub type NsIdentity = (u64, u64);

impl Namespace {
    /// What the namespace file names now; `None` for no file (or no namespace file).
    pub fn identity(&self) -> Option<NsIdentity> {
        match self {
            Namespace::File(path) => {
                let st = rustix::fs::stat(&**path).ok()?;
                Some((st.st_dev, st.st_ino))
            }
            Namespace::Host | Namespace::Invalid(_) => None,
        }
    }
}

/// One consistent view of the routing table.
#[derive(Debug, Default)]
pub struct Snapshot {
    aliases: HashMap<Arc<str>, Arc<Route>>,
    by_id: HashMap<String, Arc<Route>>,
    /// Oldest first (ties broken by id), as the raw listener wants.
    ordered: Vec<Arc<Route>>,
    prefix: String,
    suffix: String,
}

impl Snapshot {
    /// The VM a server name routes to: `<label>.<suffix>` when the prefix is empty,
    /// else `<label>.<prefix>.<suffix>`, compared lowercase without a trailing dot.
    pub fn resolve_sni(&self, sni: &str) -> Option<Arc<Route>> {
        let label = sni_label(sni, &self.prefix, &self.suffix)?;
        self.aliases.get(&*label).cloned()
    }

    /// The oldest VM: where raw listeners send their connections.
    pub fn first(&self) -> Option<Arc<Route>> {
        self.ordered.first().cloned()
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// The VM with this id, as it routes now.
    pub fn by_id(&self, id: &str) -> Option<&Arc<Route>> {
        self.by_id.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// All routes, oldest first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.ordered
    }

    fn build(routes: &BTreeMap<String, Entry>, prefix: &str, suffix: &str) -> Snapshot {
        let mut ordered: Vec<&Entry> = routes.values().collect();
        ordered.sort_by(|a, b| {
            (a.route.created_at, &a.route.id).cmp(&(b.route.created_at, &b.route.id))
        });
        let mut aliases = HashMap::with_capacity(ordered.len() * 4);
        // Oldest first, so the first VM to claim an alias keeps it.
        for entry in &ordered {
            for alias in &entry.aliases {
                aliases
                    .entry(Arc::clone(alias))
                    .or_insert_with(|| Arc::clone(&entry.route));
            }
        }
        let by_id = ordered
            .iter()
            .map(|e| (e.route.id.clone(), Arc::clone(&e.route)))
            .collect();
        Snapshot {
            aliases,
            by_id,
            ordered: ordered.into_iter().map(|e| Arc::clone(&e.route)).collect(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }
}

/// The label of `sni` under the forwarder's domain, lowercased; `None` when the name is
/// not `<label>.<prefix>.<suffix>` (or `<label>.<suffix>` with an empty prefix).
/// Borrowed unless the name has capitals, so the usual lookup allocates nothing.
pub fn sni_label<'a>(sni: &'a str, prefix: &str, suffix: &str) -> Option<Cow<'a, str>> {
    let name = sni.strip_suffix('.').unwrap_or(sni);
    let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    };
    let rest = name.strip_suffix(suffix)?.strip_suffix('.')?;
    let label = if prefix.is_empty() {
        rest
    } else {
        rest.strip_suffix(prefix)?.strip_suffix('.')?
    };
    if label.is_empty() || label.contains('.') {
        return None;
    }
    // The label is where the name starts.
    let len = label.len();
    Some(match name {
        Cow::Borrowed(s) => Cow::Borrowed(&s[..len]),
        Cow::Owned(mut s) => {
            s.truncate(len);
            Cow::Owned(s)
        }
    })
}

/// A parsed meta.json and what identifies the file it came from, so a rescan re-reads
/// only files that changed (an atomic replace always changes the inode).
#[derive(Debug, Clone)]
struct Entry {
    route: Arc<Route>,
    aliases: Vec<Arc<str>>,
    stamp: Stamp,
}

fn aliases_of(meta: &RouteMeta) -> Vec<Arc<str>> {
    mergen_model::aliases(&meta.id, &meta.tags, &meta.metadata)
        .into_iter()
        .map(Arc::from)
        .collect()
}

#[derive(Debug)]
enum Load {
    Unchanged,
    Loaded(Box<Entry>),
    Gone,
}

/// Read `<dir>/meta.json` unless `known` says it did not change. A file that cannot
/// be read or parsed is skipped with a warning; if it routed before, its last good
/// version keeps routing (an in-place rewrite caught half-way, a transient I/O error)
/// until it is fixed or removed.
fn load_dir(dir: &Path, known: Option<&Entry>, netns: &NetnsLookup) -> Load {
    let path = dir.join(META_FILE);
    let failed = || match known {
        Some(_) => Load::Unchanged,
        None => Load::Gone,
    };
    let (stamp, bytes) = match read_changed(&path, known.map(|k| k.stamp)) {
        Read::Unchanged => return Load::Unchanged,
        Read::Missing => return Load::Gone,
        Read::Changed { stamp, bytes } => (stamp, bytes),
        Read::Failed(e) => {
            log::warn!(path = path.display().to_string(), error = e.to_string(); "cannot read meta.json");
            return failed();
        }
    };
    match RouteMeta::from_slice(&bytes) {
        Ok(meta) => Load::Loaded(Box::new(Entry {
            aliases: aliases_of(&meta),
            route: Arc::new(Route {
                netns: netns.resolve(&meta.netns),
                id: meta.id,
                guest_ip: meta.guest_ip,
                created_at: meta.created_at,
                http_port: (meta.http_port != 0).then_some(meta.http_port),
            }),
            stamp,
        })),
        Err(e) => {
            log::warn!(path = path.display().to_string(), error = e.to_string(); "bad meta.json skipped");
            failed()
        }
    }
}

/// How a load finds the namespace files routes name. A few routes ask the file system
/// per candidate; a full rescan lists the namespace directories once, since 10,000
/// routes of VMs not running would otherwise cost two failed `stat`s each.
struct NetnsLookup<'a> {
    root: Option<&'a Path>,
    /// The names in each candidate directory that could be listed.
    listed: Option<HashMap<PathBuf, HashSet<OsString>>>,
}

impl<'a> NetnsLookup<'a> {
    fn probing(root: Option<&'a Path>) -> NetnsLookup<'a> {
        NetnsLookup { root, listed: None }
    }

    fn listing(root: Option<&'a Path>) -> NetnsLookup<'a> {
        let mut listed = HashMap::new();
        for dir in root
            .into_iter()
            .chain([Path::new("/run/netns"), Path::new("/var/run/netns")])
        {
            let names = match fs::read_dir(dir) {
                Ok(rd) => rd.filter_map(|e| Some(e.ok()?.file_name())).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
                // Not listable: its candidates are probed one by one.
                Err(_) => continue,
            };
            listed.insert(dir.to_path_buf(), names);
        }
        NetnsLookup {
            root,
            listed: Some(listed),
        }
    }

    fn resolve(&self, netns: &str) -> Namespace {
        Namespace::resolve_with(self.root, netns, |candidate| {
            let listing = self
                .listed
                .as_ref()
                .zip(candidate.parent())
                .and_then(|(listed, dir)| listed.get(dir));
            match (listing, candidate.file_name()) {
                // Listed: confirmed with a stat (a dangling link is listed too).
                (Some(names), Some(name)) => names.contains(name) && candidate.exists(),
                _ => candidate.exists(),
            }
        })
    }
}

/// Where the routing table comes from and how names map onto it.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `FWD_CONFIG_ROOT`: one directory per VM, each with a meta.json.
    pub config_root: PathBuf,
    /// `FWD_NETNS_ROOT`: where namespace names are looked up first.
    pub netns_root: Option<PathBuf>,
    pub domain_prefix: String,
    pub domain_suffix: String,
}

struct Shared {
    root: PathBuf,
    netns_root: Option<PathBuf>,
    prefix: String,
    suffix: String,
    current: ArcSwap<Snapshot>,
    /// Parsed files by directory name. Held only while rescanning, never by lookups.
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Told about every new snapshot (see [`Resolver::subscribe`]).
    subscribers: Mutex<Vec<mpsc::Sender<Arc<Snapshot>>>>,
    /// Bumped whenever a VM may have gone away: a new snapshot, an event in a directory
    /// of namespace files, a full rescan (see [`Resolver::generation`]).
    generation: AtomicU64,
}

impl Shared {
    fn publish(&self, entries: &BTreeMap<String, Entry>) {
        let snap = Arc::new(Snapshot::build(entries, &self.prefix, &self.suffix));
        self.current.store(Arc::clone(&snap));
        self.changed();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subscribers.retain(|s| s.send(Arc::clone(&snap)).is_ok());
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The directories holding the namespace files of the VMs known now.
    fn namespace_dirs(&self) -> HashSet<PathBuf> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .filter_map(|e| match &e.route.netns {
                Namespace::File(path) => Path::new(&**path).parent().map(Path::to_path_buf),
                Namespace::Host | Namespace::Invalid(_) => None,
            })
            .filter(|dir| dir != &self.root)
            .collect()
    }

    /// Re-read the whole root; files whose stamp did not change are not read again.
    /// With `watch`, the root is watched before it is listed and every directory in it
    /// before its file is read, so no change falls between a read and its watch.
    fn full_rescan(&self, mut watch: Option<(&mut VmDirs, &mut Watches)>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((dirs, watches)) = watch.as_mut() {
            dirs.watch_root(watches);
        }
        let listing = fs::read_dir(&self.root).and_then(|rd| {
            rd.map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        });
        let names: Vec<String> = match listing {
            Ok(names) => names
                .into_iter()
                .filter_map(|n| n.into_string().ok())
                .filter(|n| is_candidate(n))
                .collect(),
            // No root, no VMs.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            // A listing that failed says nothing about the VMs: keep routing as is.
            Err(e) => {
                log::warn!(root = self.root.display().to_string(), error = e.to_string(); "cannot list the config root, routing unchanged");
                return;
            }
        };
        if let Some((dirs, watches)) = watch {
            dirs.watch_listing(watches, &names);
        }
        let work: Vec<(String, Option<Entry>)> = names
            .into_iter()
            .map(|n| {
                let known = entries.remove(&n);
                (n, known)
            })
            .collect();
        // Whatever is left in `entries` disappeared.
        let mut changed = !entries.is_empty();
        let mut next = BTreeMap::new();
        let netns = NetnsLookup::listing(self.netns_root.as_deref());
        // Spread over the cores: a cold start with thousands of VMs is a few system
        // calls and a JSON parse per directory.
        let loaded = mergen_watch::map_parallel(work, |(name, known)| {
            let load = load_dir(&self.root.join(&name), known.as_ref(), &netns);
            (name, known, load)
        });
        for (name, known, load) in loaded {
            match load {
                Load::Unchanged => {
                    next.insert(name, known.expect("unchanged implies known"));
                }
                Load::Loaded(e) => {
                    changed = true;
                    next.insert(name, *e);
                }
                Load::Gone => changed |= known.is_some(),
            }
        }
        *entries = next;
        if changed {
            self.publish(&entries);
        } else {
            // Nothing the files say changed; what the namespace files name may have,
            // unseen by inotify (a namespace mounted over another): look again.
            self.changed();
        }
    }

    /// Re-read the VM directories named; returns whether routing changed.
    fn rescan_dirs<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        let netns = NetnsLookup::probing(self.netns_root.as_deref());
        for name in names.into_iter().filter(|n| is_candidate(n)) {
            let known = entries.get(name);
            match load_dir(&self.root.join(name), known, &netns) {
                Load::Unchanged => {}
                Load::Loaded(e) => {
                    entries.insert(name.to_string(), *e);
                    changed = true;
                }
                Load::Gone => changed |= entries.remove(name).is_some(),
            }
        }
        if changed {
            self.publish(&entries);
        }
    }
}

#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
}

impl Resolver {
    /// A resolver over `settings.config_root`, loaded once before returning.
    pub fn new(settings: Settings) -> Resolver {
        let resolver = Resolver::unloaded(settings);
        resolver.shared.full_rescan(None);
        resolver
    }

    /// A resolver over `settings.config_root` that follows it (see
    /// [`Resolver::start_watching`]), loaded once before returning: the forwarder's
    /// start, where every directory is watched as it is first read.
    pub fn watching(settings: Settings, ttl: Duration) -> io::Result<Resolver> {
        let resolver = Resolver::unloaded(settings);
        resolver.start_watching(ttl)?;
        Ok(resolver)
    }

    fn unloaded(settings: Settings) -> Resolver {
        let prefix = mergen_model::domain::normalize(&settings.domain_prefix);
        let suffix = mergen_model::domain::normalize(&settings.domain_suffix);
        let shared = Arc::new(Shared {
            root: settings.config_root,
            netns_root: settings.netns_root,
            subscribers: Mutex::new(Vec::new()),
            current: ArcSwap::from_pointee(Snapshot {
                prefix: prefix.clone(),
                suffix: suffix.clone(),
                ..Snapshot::default()
            }),
            prefix,
            suffix,
            entries: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
        });
        Resolver { shared }
    }

    /// The current routing table. Cheap: one atomic load and a reference count.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// Every snapshot published from now on, in order. The channel closes when the
    /// resolver goes.
    pub fn subscribe(&self) -> mpsc::Receiver<Arc<Snapshot>> {
        let (tx, rx) = mpsc::channel();
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// A number that changes whenever a VM may have gone away: a new routing table,
    /// a namespace file created, removed or renamed, the periodic rescan. Whoever holds
    /// connections to VMs compares it to the last one it saw (one atomic load), and on
    /// a change checks that each connection's VM still routes the same way and that
    /// its namespace file still names the namespace it was dialed in.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A synchronous full rescan.
    pub fn reload(&self) {
        self.shared.full_rescan(None);
    }

    /// Follow changes from a background thread: inotify on the root and on every VM
    /// directory, plus a full rescan every `ttl`. The thread ends once every clone of
    /// this resolver is dropped.
    pub fn start_watching(&self, ttl: Duration) -> io::Result<()> {
        let inotify = Inotify::init()?;
        let weak = Arc::downgrade(&self.shared);
        let mut dirs = VmDirs::new(&self.shared.root);
        let mut ns_dirs = NsDirs::default();
        // Whatever changed since the last load is read again, every directory watched
        // first.
        self.shared
            .full_rescan(Some((&mut dirs, &mut inotify.watches())));
        ns_dirs.watch(&mut inotify.watches(), &self.shared);
        let mut next_rescan = Instant::now() + ttl;
        watch::spawn("fwd-resolver", inotify, None, move |watches, wake| {
            let shared = weak.upgrade()?;
            let mut rescan = false;
            let mut namespaces = false;
            if let Wake::Files { mut events, lost } = wake {
                namespaces = ns_dirs.take(&mut events);
                let changes = dirs.apply(watches, events, lost);
                if changes.rescan {
                    rescan = true;
                } else if !changes.dirs.is_empty() {
                    shared.rescan_dirs(changes.dirs.iter().map(String::as_str));
                    // A new VM may keep its namespace somewhere not watched yet.
                    ns_dirs.watch(watches, &shared);
                }
            }
            let now = Instant::now();
            if rescan || now >= next_rescan {
                shared.full_rescan(Some((&mut dirs, watches)));
                ns_dirs.watch(watches, &shared);
                next_rescan = Instant::now() + ttl;
            }
            if namespaces {
                shared.changed();
            }
            Some(next_rescan.saturating_duration_since(now))
        })
    }
}

/// The directories of the known VMs' namespace files (`/run/netns`), watched: a
/// namespace deleted or made there may end connections to its VM (see
/// [`Resolver::generation`]). The VM directories themselves are [`VmDirs`]'.
#[derive(Default)]
struct NsDirs {
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl NsDirs {
    fn mask() -> WatchMask {
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::ONLYDIR
    }

    /// Watch the directories of the known VMs' namespace files not watched yet. One
    /// that does not exist yet (no namespace was ever made) is tried again later; the
    /// periodic rescan covers the meantime.
    fn watch(&mut self, watches: &mut Watches, shared: &Shared) {
        for dir in shared.namespace_dirs() {
            if self.dirs.values().any(|d| d == &dir) {
                continue;
            }
            match watches.add(&dir, Self::mask()) {
                Ok(wd) => {
                    self.dirs.insert(wd, dir);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::debug!(dir = dir.display().to_string(), error = e.to_string(); "cannot watch a namespace directory")
                }
            }
        }
    }

    /// Take the events of namespace directories out of `events`; whether there were any.
    fn take(&mut self, events: &mut Vec<EventOwned>) -> bool {
        let before = events.len();
        events.retain(|ev| {
            if !self.dirs.contains_key(&ev.wd) {
                return true;
            }
            if ev.mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&ev.wd);
            }
            false
        });
        events.len() != before
    }
}
#[cfg(test)]
mod tests {

    use mergen_testkit::{eventually, TempDir};
    use serde_json::json;

    use super::*;

    fn temp_dir() -> TempDir {
        TempDir::new("dp-resolver")
    }

    /// In memory when the machine has /dev/shm: writing thousands of files to a
    /// disk shared with fsync-heavy tests can take longer than the test itself.
    fn temp_dir_in_memory() -> TempDir {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            TempDir::new_in(shm, "dp-resolver")
        } else {
            temp_dir()
        }
    }

    fn id(n: u32) -> String {
        format!("{n:08x}-0000-4000-8000-{n:012x}")
    }

    /// Write `<root>/<id>/meta.json` atomically, created `minute` minutes after a fixed
    /// instant.
    /// A meta.json as mergend writes it, created `minute` minutes after a fixed instant.
    fn meta_json(
        n: u32,
        minute: u32,
        tags: serde_json::Value,
        metadata: serde_json::Value,
    ) -> serde_json::Value {
        let id = id(n);
        let created =
            time::OffsetDateTime::from_unix_timestamp(1_780_000_000 + i64::from(minute) * 60)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
        let cfg = format!("/etc/mergen/vm.d/{id}");
        let run = format!("/run/mergen/{id}");
        json!({
            "id": id,
            "createdAt": created,
            "rootfs": "/var/lib/mergen/base/rootfs.ext4",
            "kernel": "/var/lib/mergen/base/vmlinux",
            "ports": [{"guest": 443, "host": 20000 + n % 20000, "protocol": "tcp"}],
            "guestIP": format!("172.30.{}.{}", n / 250, n % 250 + 2),
            "tapName": format!("tap-{}", &id[..8]),
            "netns": format!("mergen-{}", &id[..8]),
            "tags": tags,
            "metadata": metadata,
            "paths": {
                "configDir": cfg,
                "vmConfigPath": format!("{cfg}/vm.json"),
                "metaPath": format!("{cfg}/meta.json"),
                "hooksPath": format!("{cfg}/hooks.json"),
                "envPath": format!("{cfg}/env"),
                "runDir": run,
                "socketPath": format!("{run}/firecracker.socket"),
                "lockPath": format!("{run}/lock"),
                "dataDir": format!("/var/lib/mergen/{id}"),
                "logsDir": format!("/var/lib/mergen/{id}/logs"),
            },
        })
    }

    /// Write `<root>/<id>/meta.json` atomically, as mergend does.
    fn write_vm(
        root: &Path,
        n: u32,
        minute: u32,
        tags: serde_json::Value,
        metadata: serde_json::Value,
    ) {
        let dir = root.join(id(n));
        fs::create_dir_all(&dir).unwrap();
        let meta = meta_json(n, minute, tags, metadata);
        mergen_model::atomic::write_json(&dir.join(META_FILE), &meta).unwrap();
    }

    fn resolver(root: &Path, prefix: &str, suffix: &str) -> Resolver {
        Resolver::new(Settings {
            config_root: root.to_path_buf(),
            netns_root: None,
            domain_prefix: prefix.into(),
            domain_suffix: suffix.into(),
        })
    }

    fn routed_id(r: &Resolver, sni: &str) -> Option<String> {
        r.snapshot().resolve_sni(sni).map(|route| route.id.clone())
    }

    #[test]
    fn sni_labels() {
        let cases: &[(&str, &str, &str, Option<&str>)] = &[
            ("app1.localhost", "", "localhost", Some("app1")),
            ("APP1.LocalHost", "", "localhost", Some("app1")),
            ("app1.localhost.", "", "localhost", Some("app1")),
            ("a.b.localhost", "", "localhost", None),
            ("localhost", "", "localhost", None),
            (".localhost", "", "localhost", None),
            ("app1localhost", "", "localhost", None),
            ("app1.localhost.com", "", "localhost", None),
            ("app1.vm.example.com", "vm", "example.com", Some("app1")),
            ("App1.VM.Example.COM.", "vm", "example.com", Some("app1")),
            ("app1.example.com", "vm", "example.com", None),
            ("app1.xvm.example.com", "vm", "example.com", None),
            ("vm.example.com", "vm", "example.com", None),
            ("a.b.vm.example.com", "vm", "example.com", None),
            ("", "", "localhost", None),
            (".", "", "localhost", None),
        ];
        for &(sni, prefix, suffix, want) in cases {
            assert_eq!(
                sni_label(sni, prefix, suffix).as_deref(),
                want,
                "{sni} / {prefix} / {suffix}"
            );
        }
    }

    #[test]
    fn aliases_and_precedence() {
        let root = temp_dir();
        // Created second, but listed first by name order on disk.
        write_vm(
            root.path(),
            1,
            20,
            json!({"app": "Web", "host": "shared"}),
            json!({"name": "one", "owner": "x"}),
        );
        write_vm(
            root.path(),
            2,
            10,
            json!({"app": "web", "hostname": "two"}),
            json!({"host": 5, "app": "meta-app"}),
        );
        // Its tag claims VM 1's short id; VM 1 is older... no: VM 3 is the oldest.
        write_vm(
            root.path(),
            3,
            5,
            json!({"name": id(1)[..8].to_string()}),
            json!({"name": "with.dot"}),
        );
        let r = resolver(root.path(), "", "localhost");
        let snap = r.snapshot();
        assert_eq!(snap.len(), 3);
        assert_eq!(snap.first().unwrap().id, id(3));
        let order: Vec<_> = snap.routes().iter().map(|r| r.id.clone()).collect();
        assert_eq!(order, vec![id(3), id(2), id(1)]);

        let cases: &[(&str, Option<String>)] = &[
            // The oldest claimant keeps a shared alias.
            ("web.localhost", Some(id(2))),
            ("shared.localhost", Some(id(1))),
            ("one.localhost", Some(id(1))),
            ("two.localhost", Some(id(2))),
            ("meta-app.localhost", Some(id(2))),
            (&format!("{}.localhost", id(2)), Some(id(2))),
            (&format!("{}.localhost", &id(2)[..8]), Some(id(2))),
            (&format!("{}.localhost", id(1).to_uppercase()), Some(id(1))),
            // VM 3 is older than VM 1 and claimed VM 1's short id by its tag.
            (&format!("{}.localhost", &id(1)[..8]), Some(id(3))),
            // Non-string metadata and names with dots are not aliases.
            ("5.localhost", None),
            ("with.dot.localhost", None),
            ("owner.localhost", None),
            ("x.localhost", None),
            ("nope.localhost", None),
            ("web.example.com", None),
        ];
        for (sni, want) in cases {
            assert_eq!(routed_id(&r, sni).as_ref(), want.as_ref(), "{sni}");
        }
        let route = snap.resolve_sni("one.localhost").unwrap();
        assert_eq!(route.guest_ip, Ipv4Addr::new(172, 30, 0, 3));
        // Not made yet: where `ip netns add` will put it.
        let file = format!("/run/netns/mergen-{}", &id(1)[..8]);
        assert_eq!(route.netns, Namespace::File(Arc::from(file.as_str())));
    }

    #[test]
    fn prefix_and_suffix() {
        let root = temp_dir();
        write_vm(root.path(), 1, 0, json!({"app": "app1"}), json!({}));
        let r = resolver(root.path(), ".VM", "Example.com.");
        assert_eq!(routed_id(&r, "app1.vm.example.com"), Some(id(1)));
        assert_eq!(routed_id(&r, "APP1.VM.EXAMPLE.COM."), Some(id(1)));
        assert_eq!(routed_id(&r, "app1.example.com"), None);
        assert_eq!(routed_id(&r, "app1.localhost"), None);
    }

    #[test]
    fn bad_and_foreign_entries_are_skipped() {
        let root = temp_dir();
        write_vm(root.path(), 1, 0, json!({"app": "good"}), json!({}));
        let bad = root.path().join("bad");
        fs::create_dir(&bad).unwrap();
        fs::write(bad.join(META_FILE), b"{\"id\": \"x\", not json").unwrap();
        let missing_ip = root.path().join("noip");
        fs::create_dir(&missing_ip).unwrap();
        fs::write(
            missing_ip.join(META_FILE),
            br#"{"id":"noip","createdAt":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        fs::create_dir(root.path().join("empty")).unwrap();
        fs::write(root.path().join("stray-file"), b"x").unwrap();
        // A half-written atomic write lives under a dot-name.
        let hidden = root.path().join(".tmp-vm");
        fs::create_dir(&hidden).unwrap();
        fs::copy(
            root.path().join(id(1)).join(META_FILE),
            hidden.join(META_FILE),
        )
        .unwrap();
        fs::write(root.path().join(id(1)).join(".meta.json.tmp-1"), b"{").unwrap();
        let r = resolver(root.path(), "", "localhost");
        assert_eq!(r.snapshot().len(), 1);
        assert_eq!(routed_id(&r, "good.localhost"), Some(id(1)));
    }

    /// Fields the forwarder does not route by never stop a VM from routing: Go's
    /// `null` collections, a newer mergend's hook or port fields.
    #[test]
    fn only_the_routing_fields_must_parse() {
        let root = temp_dir();
        let mut meta = meta_json(1, 0, json!(null), json!({"app": "go"}));
        meta["ports"] = json!(null);
        meta["hooks"] = json!({"onCreate": [{"type": "grpc", "target": "x"}]});
        let dir = root.path().join(id(1));
        fs::create_dir_all(&dir).unwrap();
        mergen_model::atomic::write_json(&dir.join(META_FILE), &meta).unwrap();
        let mut other = meta_json(2, 1, json!({"app": "new"}), json!({}));
        other["ports"] = json!([{"guest": 80, "host": 20001, "protocol": "sctp"}]);
        let dir = root.path().join(id(2));
        fs::create_dir_all(&dir).unwrap();
        mergen_model::atomic::write_json(&dir.join(META_FILE), &other).unwrap();
        let r = resolver(root.path(), "", "localhost");
        assert_eq!(routed_id(&r, "go.localhost"), Some(id(1)));
        assert_eq!(routed_id(&r, "new.localhost"), Some(id(2)));
    }

    /// `httpPort` as the later original writes it; absent, 0, or a value no port can
    /// have leaves it unset and the VM routable.
    #[test]
    fn http_port_is_read_with_the_route() {
        let root = temp_dir();
        for (n, port) in [
            (1, json!(8080)),
            (2, json!(0)),
            (3, json!(null)),
            (4, json!(70000)),
            (5, json!("80")),
        ] {
            let mut meta = meta_json(n, n, json!({"app": format!("web{n}")}), json!({}));
            meta["httpPort"] = port;
            let dir = root.path().join(id(n));
            fs::create_dir_all(&dir).unwrap();
            mergen_model::atomic::write_json(&dir.join(META_FILE), &meta).unwrap();
        }
        write_vm(root.path(), 6, 6, json!({"app": "web6"}), json!({}));
        let r = resolver(root.path(), "", "localhost");
        let port = |n: u32| {
            r.snapshot()
                .resolve_sni(&format!("web{n}.localhost"))
                .map(|route| route.http_port)
        };
        assert_eq!(port(1), Some(Some(8080)));
        for n in 2..=6 {
            assert_eq!(port(n), Some(None), "web{n}");
        }
    }

    #[test]
    fn a_known_vm_keeps_its_last_good_meta() {
        let root = temp_dir();
        write_vm(root.path(), 1, 0, json!({"app": "good"}), json!({}));
        let r = resolver(root.path(), "", "localhost");
        let meta = root.path().join(id(1)).join(META_FILE);
        fs::write(&meta, b"{\"id\": \"half-writ").unwrap();
        r.reload();
        assert_eq!(routed_id(&r, "good.localhost"), Some(id(1)));
        // Fixed: the new version routes.
        write_vm(root.path(), 1, 0, json!({"app": "fixed"}), json!({}));
        r.reload();
        assert_eq!(routed_id(&r, "fixed.localhost"), Some(id(1)));
        // Removed: it stops routing.
        fs::remove_file(&meta).unwrap();
        r.reload();
        assert!(r.snapshot().is_empty());
        // A bad file never seen good does not route.
        fs::write(&meta, b"{").unwrap();
        r.reload();
        assert!(r.snapshot().is_empty());
    }

    #[test]
    fn missing_root_is_empty() {
        let root = temp_dir();
        let r = resolver(&root.path().join("absent"), "", "localhost");
        assert!(r.snapshot().is_empty());
        assert!(r.snapshot().first().is_none());
    }

    #[test]
    fn reload_sees_changes() {
        let root = temp_dir();
        write_vm(root.path(), 1, 0, json!({"app": "old"}), json!({}));
        let r = resolver(root.path(), "", "localhost");
        let before = r.snapshot();
        write_vm(root.path(), 1, 0, json!({"app": "new"}), json!({}));
        write_vm(root.path(), 2, 1, json!({}), json!({}));
        r.reload();
        assert_eq!(routed_id(&r, "new.localhost"), Some(id(1)));
        assert_eq!(routed_id(&r, "old.localhost"), None);
        assert_eq!(r.snapshot().len(), 2);
        // An old snapshot is unaffected: lookups in flight stay consistent.
        assert_eq!(before.resolve_sni("old.localhost").unwrap().id, id(1));
        fs::remove_dir_all(root.path().join(id(1))).unwrap();
        r.reload();
        assert_eq!(r.snapshot().len(), 1);
        assert_eq!(r.snapshot().first().unwrap().id, id(2));
    }

    #[test]
    fn watcher_follows_vms_within_a_second() {
        let root = temp_dir();
        write_vm(root.path(), 1, 0, json!({"app": "first"}), json!({}));
        let r = resolver(root.path(), "", "localhost");
        // A long rescan period: only inotify can make these changes visible in time.
        r.start_watching(Duration::from_secs(3600)).unwrap();
        let within = Duration::from_secs(1);

        write_vm(root.path(), 2, 1, json!({"app": "late"}), json!({}));
        assert!(
            eventually(within, || routed_id(&r, "late.localhost") == Some(id(2))),
            "new VM"
        );

        // A rewrite of an existing meta.json.
        write_vm(root.path(), 2, 1, json!({"app": "renamed"}), json!({}));
        assert!(
            eventually(within, || routed_id(&r, "renamed.localhost") == Some(id(2))),
            "rewrite"
        );
        assert_eq!(routed_id(&r, "late.localhost"), None);

        // A plain (non-atomic) write into a directory created empty first.
        let dir = root.path().join(id(3));
        fs::create_dir(&dir).unwrap();
        let mut meta: serde_json::Value =
            serde_json::from_slice(&fs::read(root.path().join(id(1)).join(META_FILE)).unwrap())
                .unwrap();
        meta["id"] = json!(id(3));
        meta["tags"] = json!({"app": "plain"});
        fs::write(dir.join(META_FILE), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert!(
            eventually(within, || routed_id(&r, "plain.localhost") == Some(id(3))),
            "plain write"
        );

        // Removing a meta.json, then a whole directory.
        fs::remove_file(dir.join(META_FILE)).unwrap();
        assert!(
            eventually(within, || routed_id(&r, "plain.localhost").is_none()),
            "file removed"
        );
        fs::remove_dir_all(root.path().join(id(2))).unwrap();
        assert!(
            eventually(within, || r.snapshot().len() == 1),
            "dir removed"
        );

        // A directory moved in from elsewhere.
        let outside = temp_dir();
        write_vm(outside.path(), 4, 2, json!({"app": "moved"}), json!({}));
        fs::rename(outside.path().join(id(4)), root.path().join(id(4))).unwrap();
        assert!(
            eventually(within, || routed_id(&r, "moved.localhost") == Some(id(4))),
            "moved in"
        );

        // Moved out and back: it leaves, returns, and is still followed afterwards.
        fs::rename(root.path().join(id(4)), outside.path().join(id(4))).unwrap();
        assert!(
            eventually(within, || routed_id(&r, "moved.localhost").is_none()),
            "moved out"
        );
        write_vm(outside.path(), 4, 2, json!({"app": "outside"}), json!({}));
        fs::rename(outside.path().join(id(4)), root.path().join(id(4))).unwrap();
        assert!(
            eventually(within, || routed_id(&r, "outside.localhost") == Some(id(4))),
            "moved back"
        );
        write_vm(root.path(), 4, 2, json!({"app": "back"}), json!({}));
        assert!(
            eventually(within, || routed_id(&r, "back.localhost") == Some(id(4))),
            "rewritten after moving back"
        );
        assert_eq!(routed_id(&r, "first.localhost"), Some(id(1)));
    }

    #[test]
    fn periodic_rescan_catches_what_inotify_cannot() {
        let parent = temp_dir();
        let root = parent.path().join("late-root");
        let r = resolver(&root, "", "localhost");
        r.start_watching(Duration::from_millis(50)).unwrap();
        // The root did not exist when watching began.
        fs::create_dir(&root).unwrap();
        write_vm(&root, 7, 0, json!({"app": "seven"}), json!({}));
        assert!(eventually(Duration::from_secs(5), || routed_id(
            &r,
            "seven.localhost"
        ) == Some(id(7))));
        // Once the root is watched, inotify takes over too.
        write_vm(&root, 8, 1, json!({"app": "eight"}), json!({}));
        assert!(eventually(Duration::from_secs(5), || routed_id(
            &r,
            "eight.localhost"
        ) == Some(id(8))));
    }

    #[test]
    fn ten_thousand_vms() {
        let root = temp_dir_in_memory();
        let n = 10_000u32;
        // Plain writes: fsyncing 10,000 files would dominate the test.
        for i in 0..n {
            let dir = root.path().join(id(i));
            fs::create_dir(&dir).unwrap();
            let tags = json!({"app": format!("app{i}")});
            let meta = meta_json(i, i, tags, json!({"name": format!("n{i}")}));
            fs::write(
                dir.join(META_FILE),
                serde_json::to_vec_pretty(&meta).unwrap(),
            )
            .unwrap();
        }
        let started = Instant::now();
        let r = resolver(root.path(), "", "localhost");
        eprintln!("loaded {n} VMs in {:?}", started.elapsed());
        let snap = r.snapshot();
        assert_eq!(snap.len(), n as usize);
        assert_eq!(snap.first().unwrap().id, id(0));
        for i in [0, 1, 4999, 9999] {
            assert_eq!(routed_id(&r, &format!("app{i}.localhost")), Some(id(i)));
            assert_eq!(routed_id(&r, &format!("n{i}.localhost")), Some(id(i)));
            assert_eq!(
                routed_id(&r, &format!("{}.localhost", &id(i)[..8])),
                Some(id(i))
            );
            assert_eq!(routed_id(&r, &format!("{}.localhost", id(i))), Some(id(i)));
        }
        // A rescan with nothing changed keeps the published snapshot.
        let started = Instant::now();
        r.reload();
        eprintln!("rescanned {n} unchanged VMs in {:?}", started.elapsed());
        assert!(Arc::ptr_eq(&snap, &r.snapshot()));
        // One more VM: a rescan, one parse and a new snapshot of all of them.
        write_vm(root.path(), n, n, json!({"app": "extra"}), json!({}));
        let started = Instant::now();
        r.reload();
        eprintln!("rescanned with one new VM in {:?}", started.elapsed());
        assert_eq!(routed_id(&r, "extra.localhost"), Some(id(n)));
        // What an inotify event costs: one directory re-read, a new snapshot.
        write_vm(root.path(), n, n, json!({"app": "changed"}), json!({}));
        let started = Instant::now();
        r.shared.rescan_dirs([id(n).as_str()]);
        eprintln!(
            "re-read one VM directory and republished in {:?}",
            started.elapsed()
        );
        assert_eq!(routed_id(&r, "changed.localhost"), Some(id(n)));
        let started = Instant::now();
        for i in 0..n {
            assert!(r
                .snapshot()
                .resolve_sni(&format!("app{i}.localhost"))
                .is_some());
        }
        eprintln!("{n} lookups in {:?}", started.elapsed());
    }

    #[test]
    fn namespaces_resolve_once_to_their_file() {
        let root = temp_dir();
        let name = format!("mgn-test-{}", std::process::id());
        fs::write(root.path().join(&name), b"").unwrap();
        let file = |p: &Path| Namespace::File(Arc::from(p.to_str().unwrap()));
        assert_eq!(
            Namespace::resolve(Some(root.path()), &name),
            file(&root.path().join(&name))
        );
        assert_eq!(
            Namespace::resolve(Some(root.path()), "/proc/self/ns/net"),
            file(Path::new("/proc/self/ns/net"))
        );
        // Not there yet: the first candidate, where it will be looked for.
        assert_eq!(
            Namespace::resolve(Some(root.path()), "absent-ns-xyz"),
            file(&root.path().join("absent-ns-xyz"))
        );
        assert_eq!(
            Namespace::resolve(None, "absent-ns-xyz"),
            file(Path::new("/run/netns/absent-ns-xyz"))
        );
        assert_eq!(Namespace::resolve(Some(root.path()), ""), Namespace::Host);
        for bad in [".", "..", "a/b", "../etc"] {
            assert_eq!(
                Namespace::resolve(Some(root.path()), bad),
                Namespace::Invalid(bad.to_string()),
                "{bad}"
            );
        }
        // A full rescan lists the directories instead of probing: same answers, a
        // dangling link included.
        std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
        let listing = NetnsLookup::listing(Some(root.path()));
        let probing = NetnsLookup::probing(Some(root.path()));
        for name in [
            name.as_str(),
            "/proc/self/ns/net",
            "absent-ns-xyz",
            "dangling",
            "",
            "..",
            "a/b",
        ] {
            assert_eq!(listing.resolve(name), probing.resolve(name), "{name}");
            assert_eq!(
                probing.resolve(name),
                Namespace::resolve(Some(root.path()), name),
                "{name}"
            );
        }
    }

    /// `FWD_NETNS_ROOT` first, then `/run/netns` (then `/var/run/netns`).
    #[test]
    fn netns_lookup_order() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIP: netns_lookup_order needs root");
            return;
        }
        struct Removed(PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.0);
            }
        }
        let file = |p: &Path| Namespace::File(Arc::from(p.to_str().unwrap()));
        let root = temp_dir();
        let name = format!("mgn-ord-{}", std::process::id());
        fs::create_dir_all("/run/netns").unwrap();
        let system = Removed(Path::new("/run/netns").join(&name));
        fs::write(&system.0, b"").unwrap();
        // Only in /run/netns: found there, with or without a root.
        assert_eq!(
            Namespace::resolve(Some(root.path()), &name),
            file(&system.0)
        );
        assert_eq!(Namespace::resolve(None, &name), file(&system.0));
        // In both: the configured root wins.
        fs::write(root.path().join(&name), b"").unwrap();
        assert_eq!(
            Namespace::resolve(Some(root.path()), &name),
            file(&root.path().join(&name))
        );
    }

    #[test]
    fn subscribers_see_every_new_snapshot() {
        let root = temp_dir();
        let r = resolver(root.path(), "", "localhost");
        let rx = r.subscribe();
        write_vm(root.path(), 1, 0, json!({"app": "one"}), json!({}));
        r.reload();
        let snap = rx.recv_timeout(Duration::from_secs(1)).expect("a snapshot");
        assert!(Arc::ptr_eq(&snap, &r.snapshot()));
        // Nothing changed: nothing published.
        r.reload();
        assert!(rx.try_recv().is_err());
        drop(r);
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_err(),
            "closed with the resolver"
        );
    }

    /// A namespace file created or removed where the VMs keep theirs changes the
    /// generation at once (the workers then check their connections); so does a new
    /// routing table. `by_id` finds each VM as it routes now.
    #[test]
    fn namespace_events_and_new_tables_change_the_generation() {
        let root = temp_dir();
        let ns_dir = temp_dir();
        let ns_file = ns_dir.path().join("vm-one");
        fs::write(&ns_file, b"").unwrap();
        let dir = root.path().join(id(1));
        fs::create_dir_all(&dir).unwrap();
        let mut meta = meta_json(1, 0, json!({"app": "one"}), json!({}));
        meta["netns"] = json!(ns_file.to_str().unwrap());
        mergen_model::atomic::write_json(&dir.join(META_FILE), &meta).unwrap();
        let r = resolver(root.path(), "", "localhost");
        r.start_watching(Duration::from_secs(3600)).unwrap();
        let route = Arc::clone(r.snapshot().by_id(&id(1)).expect("by id"));
        assert!(route.netns.identity().is_some());
        assert!(r.snapshot().by_id(&id(2)).is_none());

        let g = r.generation();
        fs::remove_file(&ns_file).unwrap();
        assert!(
            eventually(Duration::from_secs(1), || r.generation() != g),
            "a namespace removed"
        );
        assert_eq!(route.netns.identity(), None);
        let g = r.generation();
        fs::write(&ns_file, b"").unwrap();
        assert!(
            eventually(Duration::from_secs(1), || r.generation() != g),
            "a namespace made"
        );
        assert!(route.netns.identity().is_some());
        let g = r.generation();
        write_vm(root.path(), 2, 1, json!({"app": "two"}), json!({}));
        assert!(
            eventually(Duration::from_secs(1), || r.generation() != g),
            "a new table"
        );
        assert!(r.snapshot().by_id(&id(2)).is_some());
    }
}
