//! The routing table: every `$FWD_CONFIG_ROOT/*/meta.json`, turned into an immutable
//! [`Snapshot`] that the data path reads without locks. A rescan builds a new snapshot
//! aside and swaps it in; inotify makes a VM's arrival or departure visible within
//! milliseconds, and a periodic full rescan covers anything inotify missed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use mergen_model::Meta;
use time::OffsetDateTime;

pub const META_FILE: &str = "meta.json";
/// The tag and metadata keys whose string values are aliases, as in the original.
pub const ALIAS_KEYS: [&str; 4] = ["host", "hostname", "app", "name"];

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub id: String,
    pub guest_ip: Ipv4Addr,
    /// As written in meta.json: a namespace name, or an absolute path to its file.
    /// [`netns_path`] finds the file.
    pub netns: String,
    pub created_at: OffsetDateTime,
}

/// One consistent view of the routing table.
#[derive(Debug, Default)]
pub struct Snapshot {
    aliases: HashMap<String, Arc<Route>>,
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
        self.aliases.get(&label).cloned()
    }

    /// The oldest VM: where raw listeners send their connections.
    pub fn first(&self) -> Option<Arc<Route>> {
        self.ordered.first().cloned()
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// All routes, oldest first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.ordered
    }

    fn build(routes: &BTreeMap<String, Entry>, prefix: &str, suffix: &str) -> Snapshot {
        let mut ordered: Vec<(&Entry, Arc<Route>)> = routes
            .values()
            .map(|e| (e, Arc::new(e.route.clone())))
            .collect();
        ordered.sort_by(|(a, _), (b, _)| {
            (a.route.created_at, &a.route.id).cmp(&(b.route.created_at, &b.route.id))
        });
        let mut aliases = HashMap::with_capacity(ordered.len() * 3);
        // Oldest first, so the first VM to claim an alias keeps it.
        for (entry, route) in &ordered {
            for alias in &entry.aliases {
                aliases
                    .entry(alias.clone())
                    .or_insert_with(|| Arc::clone(route));
            }
        }
        Snapshot {
            aliases,
            ordered: ordered.into_iter().map(|(_, r)| r).collect(),
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }
}

/// The label of `sni` under the forwarder's domain, lowercased; `None` when the name is
/// not `<label>.<prefix>.<suffix>` (or `<label>.<suffix>` with an empty prefix).
pub fn sni_label(sni: &str, prefix: &str, suffix: &str) -> Option<String> {
    let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
    let rest = name.strip_suffix(suffix)?.strip_suffix('.')?;
    let label = if prefix.is_empty() {
        rest
    } else {
        rest.strip_suffix(prefix)?.strip_suffix('.')?
    };
    if label.is_empty() || label.contains('.') {
        return None;
    }
    Some(label.to_string())
}

/// The file of a VM's namespace: an absolute path as is, else the first existing of
/// `<netns_root>/<name>`, `/run/netns/<name>`, `/var/run/netns/<name>`.
pub fn netns_path(netns_root: Option<&Path>, netns: &str) -> Option<PathBuf> {
    let p = Path::new(netns);
    if p.is_absolute() {
        return Some(p.to_path_buf());
    }
    if netns.is_empty() || netns.contains('/') || netns == "." || netns == ".." {
        return None;
    }
    netns_root
        .into_iter()
        .chain([Path::new("/run/netns"), Path::new("/var/run/netns")])
        .map(|root| root.join(netns))
        .find(|candidate| candidate.exists())
}

/// A parsed meta.json and what identifies the file it came from, so a rescan re-reads
/// only files that changed (an atomic replace always changes the inode).
#[derive(Debug, Clone)]
struct Entry {
    route: Route,
    aliases: Vec<String>,
    stamp: Stamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

fn aliases_of(meta: &Meta) -> Vec<String> {
    let mut out = vec![meta.id.to_ascii_lowercase()];
    out.push(mergen_model::names::short_id(&meta.id).to_ascii_lowercase());
    for key in ALIAS_KEYS {
        if let Some(v) = meta.tags.get(key) {
            out.push(v.to_ascii_lowercase());
        }
    }
    for key in ALIAS_KEYS {
        if let Some(serde_json::Value::String(v)) = meta.metadata.get(key) {
            out.push(v.to_ascii_lowercase());
        }
    }
    // A name with a dot can never be a label; an empty one never matches.
    out.retain(|a| !a.is_empty() && !a.contains('.'));
    let mut seen = Vec::with_capacity(out.len());
    out.retain(|a| {
        let fresh = !seen.contains(a);
        if fresh {
            seen.push(a.clone());
        }
        fresh
    });
    out
}

/// Whether a directory entry of the root can be a VM: dot-names are temporary files
/// and directories of atomic writes.
fn is_candidate(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.')
}

#[derive(Debug)]
enum Load {
    Unchanged,
    Loaded(Box<Entry>),
    Gone,
}

/// Read `<dir>/meta.json` unless `known` says it did not change.
fn load_dir(dir: &Path, known: Option<&Entry>) -> Load {
    let path = dir.join(META_FILE);
    let md = match fs::metadata(&path) {
        Ok(md) if md.is_file() => md,
        Ok(_) => return Load::Gone,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::NotADirectory {
                log::warn!(path = path.display().to_string(), error = e.to_string(); "cannot stat meta.json");
            }
            return Load::Gone;
        }
    };
    let stamp = Stamp::of(&md);
    if known.is_some_and(|k| k.stamp == stamp) {
        return Load::Unchanged;
    }
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!(path = path.display().to_string(), error = e.to_string(); "cannot read meta.json, VM skipped");
            }
            return Load::Gone;
        }
    };
    match Meta::from_slice(&bytes) {
        Ok(meta) => Load::Loaded(Box::new(Entry {
            aliases: aliases_of(&meta),
            route: Route {
                id: meta.id,
                guest_ip: meta.guest_ip,
                netns: meta.netns,
                created_at: meta.created_at,
            },
            stamp,
        })),
        Err(e) => {
            log::warn!(path = path.display().to_string(), error = e.to_string(); "bad meta.json, VM skipped");
            Load::Gone
        }
    }
}

struct Shared {
    root: PathBuf,
    prefix: String,
    suffix: String,
    current: ArcSwap<Snapshot>,
    /// Parsed files by directory name. Held only while rescanning, never by lookups.
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Shared {
    fn publish(&self, entries: &BTreeMap<String, Entry>) {
        let snap = Snapshot::build(entries, &self.prefix, &self.suffix);
        self.current.store(Arc::new(snap));
    }

    fn full_rescan(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = match fs::read_dir(&self.root) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| is_candidate(n))
                .collect(),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!(root = self.root.display().to_string(), error = e.to_string(); "cannot list the config root");
                }
                Vec::new()
            }
        };
        let mut changed = false;
        let mut next = BTreeMap::new();
        for name in names {
            let known = entries.remove(&name);
            match load_dir(&self.root.join(&name), known.as_ref()) {
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
        // Whatever is left in `entries` disappeared.
        changed |= !entries.is_empty();
        *entries = next;
        if changed {
            self.publish(&entries);
        }
    }

    /// Re-read the VM directories named; returns whether routing changed.
    fn rescan_dirs<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for name in names {
            let known = entries.get(name);
            match load_dir(&self.root.join(name), known) {
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
    /// A resolver over `config_root`, loaded once before returning.
    pub fn new(config_root: PathBuf, domain_prefix: String, domain_suffix: String) -> Resolver {
        let norm = |s: String| s.trim().trim_matches('.').to_ascii_lowercase();
        let prefix = norm(domain_prefix);
        let suffix = norm(domain_suffix);
        let shared = Arc::new(Shared {
            root: config_root,
            current: ArcSwap::from_pointee(Snapshot {
                prefix: prefix.clone(),
                suffix: suffix.clone(),
                ..Snapshot::default()
            }),
            prefix,
            suffix,
            entries: Mutex::new(BTreeMap::new()),
        });
        shared.full_rescan();
        Resolver { shared }
    }

    /// The current routing table. Cheap: one atomic load and a reference count.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.current.load_full()
    }

    /// A synchronous full rescan.
    pub fn reload(&self) {
        self.shared.full_rescan();
    }

    /// Follow changes from a background thread: inotify on the root and on every VM
    /// directory, plus a full rescan every `ttl`. The thread ends once every clone of
    /// this resolver is dropped.
    pub fn start_watching(&self, ttl: Duration) -> io::Result<()> {
        let inotify = Inotify::init()?;
        let weak = Arc::downgrade(&self.shared);
        let mut watcher = Watcher {
            inotify,
            root_wd: None,
            dirs: HashMap::new(),
        };
        watcher.sync_watches(&self.shared);
        // Files may have appeared between the first load and the watches.
        self.shared.full_rescan();
        std::thread::Builder::new()
            .name("fwd-resolver".into())
            .spawn(move || watcher.run(weak, ttl))?;
        Ok(())
    }
}

/// How often the watcher thread checks that its resolver still exists.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

struct Watcher {
    inotify: Inotify,
    root_wd: Option<WatchDescriptor>,
    dirs: HashMap<WatchDescriptor, String>,
}

impl Watcher {
    fn root_mask() -> WatchMask {
        WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
    }

    fn dir_mask() -> WatchMask {
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CREATE
            | WatchMask::ONLYDIR
    }

    fn watch_dir(&mut self, root: &Path, name: &str) {
        match self
            .inotify
            .watches()
            .add(root.join(name), Self::dir_mask())
        {
            Ok(wd) => {
                self.dirs.insert(wd, name.to_string());
            }
            // Not a directory, or gone already: nothing to follow.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTDIR)
                    || e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!(dir = name, error = e.to_string(); "cannot watch VM directory"),
        }
    }

    /// Watch the root (if it exists now) and every VM directory in it.
    fn sync_watches(&mut self, shared: &Shared) {
        if self.root_wd.is_none() {
            match self.inotify.watches().add(&shared.root, Self::root_mask()) {
                Ok(wd) => self.root_wd = Some(wd),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(e) => {
                    log::warn!(root = shared.root.display().to_string(), error = e.to_string(); "cannot watch the config root");
                    return;
                }
            }
        }
        let Ok(rd) = fs::read_dir(&shared.root) else {
            return;
        };
        let watched: Vec<String> = self.dirs.values().cloned().collect();
        for name in rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_candidate(n) && !watched.contains(n))
        {
            self.watch_dir(&shared.root, &name);
        }
    }

    fn run(mut self, weak: Weak<Shared>, ttl: Duration) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut next_rescan = Instant::now() + ttl;
        loop {
            let now = Instant::now();
            let wait = next_rescan
                .saturating_duration_since(now)
                .min(LIVENESS_CHECK);
            let ready = wait_readable(&self.inotify, wait);
            let Some(shared) = weak.upgrade() else {
                return;
            };
            if ready {
                self.drain(&shared, &mut buf);
            }
            if Instant::now() >= next_rescan {
                self.sync_watches(&shared);
                shared.full_rescan();
                next_rescan = Instant::now() + ttl;
            }
        }
    }

    /// Apply every queued event, then publish once.
    fn drain(&mut self, shared: &Shared, buf: &mut [u8]) {
        let mut dirty: Vec<String> = Vec::new();
        let mut full = false;
        loop {
            let events = match self.inotify.read_events(buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!(error = e.to_string(); "inotify read failed, rescanning");
                    full = true;
                    break;
                }
            };
            let mut any = false;
            let mut new_dirs = Vec::new();
            for ev in events {
                any = true;
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    full = true;
                    continue;
                }
                let name = ev.name.and_then(|n| n.to_str()).map(str::to_string);
                if Some(&ev.wd) == self.root_wd.as_ref() {
                    if ev
                        .mask
                        .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                    {
                        // The root itself went away: start over when it comes back.
                        self.root_wd = None;
                        full = true;
                        continue;
                    }
                    let Some(name) = name.filter(|n| is_candidate(n)) else {
                        continue;
                    };
                    if ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
                        && ev.mask.contains(EventMask::ISDIR)
                    {
                        new_dirs.push(name.clone());
                    }
                    dirty.push(name);
                } else if let Some(dir) = self.dirs.get(&ev.wd) {
                    if ev.mask.contains(EventMask::IGNORED) {
                        let dir = dir.clone();
                        self.dirs.remove(&ev.wd);
                        dirty.push(dir);
                    } else if name.as_deref() == Some(META_FILE) {
                        dirty.push(dir.clone());
                    }
                }
            }
            for name in new_dirs {
                self.watch_dir(&shared.root, &name);
            }
            if !any {
                break;
            }
        }
        if full {
            self.sync_watches(shared);
            shared.full_rescan();
        } else if !dirty.is_empty() {
            dirty.sort();
            dirty.dedup();
            shared.rescan_dirs(dirty.iter().map(String::as_str));
        }
    }
}

/// Wait up to `timeout` for `fd` to become readable.
fn wait_readable(fd: &impl AsFd, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}
