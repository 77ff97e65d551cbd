//! What mergend knows of the VM store without reading it: every VM dir's meta.json,
//! read once and kept in step with the files, so that a create allocates and a list
//! answers without re-reading thousands of files.
//!
//! In step means that a change completed before a create or a list began is seen by
//! it, whoever made it: this mergend, another one on the same roots, an operator, a
//! tool. mergend watches the config root and every VM dir with inotify (the same
//! [`VmDirs`] the forwarder follows them with) and drains the queue before each use,
//! on the calling thread: the kernel queues an event before the call that caused it
//! returns, and another mergend commits a create (renames its dir into place) before it
//! releases the allocation lock that this one then takes. Lost events (a full queue)
//! and a root that went away mean a full rescan. Dirs the watch limit left unwatched,
//! and every dir on a host where no inotify instance can be had, are checked by their
//! file's stamp (one `stat`) each time instead. A rescan reads only files whose stamp
//! changed.
//!
//! A meta.json the model cannot read still holds its addresses: its `guestIP` and
//! `ports[].host` are picked out leniently and stay reserved, and one that is not even
//! that refuses creates, naming the file, until it is fixed (as the original did).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use inotify::Inotify;
use mergen_model::names::is_valid_id;
use mergen_model::Meta;
use mergen_watch::{read_changed, Read, Stamp, VmDirs, META_FILE};

use crate::alloc::Taken;
use crate::summary::Rendered;

/// A listed VM: its record, and its summary's parts that come from it.
#[derive(Debug)]
pub struct Vm {
    pub meta: Meta,
    /// Rendered by the first list that shows it, not by the load: start-up with
    /// thousands of VMs reads them all and shows none.
    rendered: OnceLock<Rendered>,
}

impl Vm {
    fn new(meta: Meta) -> Vm {
        Vm {
            meta,
            rendered: OnceLock::new(),
        }
    }

    /// The parts of its summary that come from its record.
    pub fn rendered(&self) -> &Rendered {
        self.rendered.get_or_init(|| Rendered::new(&self.meta))
    }
}

/// The listed VMs, newest first (ties by id), as `GET /v1/vms` shows them.
pub type View = Arc<[Arc<Vm>]>;

/// A VM dir that is not listed, and why (for start-up's report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlisted {
    pub dir: PathBuf,
    pub why: String,
}

pub struct Index {
    root: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    follow: Follow,
    /// By dir name; dirs without a meta.json have none. Changed only through
    /// [`Inner::put`] and [`Inner::take`], which keep `taken` and `unreadable` in step.
    records: HashMap<String, Record>,
    /// What the records hold, so a create does not gather it from every VM.
    taken: Taken,
    /// The records of kind `Unreadable`, by name, with why.
    unreadable: BTreeMap<String, String>,
    /// Built when asked for after a change.
    view: Option<View>,
}

impl Inner {
    fn put(&mut self, name: String, record: Record) {
        self.take(&name);
        match &record.kind {
            Kind::Vm(vm) => self
                .taken
                .hold(vm.meta.guest_ip, vm.meta.ports.iter().map(|p| p.host)),
            Kind::Reserved { ip, ports, .. } => self.taken.hold(*ip, ports.iter().copied()),
            Kind::Unreadable(why) => {
                self.unreadable.insert(name.clone(), why.clone());
            }
        }
        self.records.insert(name, record);
    }

    fn take(&mut self, name: &str) -> Option<Record> {
        let record = self.records.remove(name)?;
        match &record.kind {
            Kind::Vm(vm) => self
                .taken
                .release(vm.meta.guest_ip, vm.meta.ports.iter().map(|p| p.host)),
            Kind::Reserved { ip, ports, .. } => self.taken.release(*ip, ports.iter().copied()),
            Kind::Unreadable(_) => {
                self.unreadable.remove(name);
            }
        }
        Some(record)
    }
}

enum Follow {
    Inotify {
        inotify: Inotify,
        dirs: VmDirs,
        buf: Vec<u8>,
    },
    /// No inotify instance: every use checks every file's stamp.
    Stamps,
}

#[derive(Debug)]
struct Record {
    /// The version read; `None` when it could not be read (read again every time).
    stamp: Option<Stamp>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Vm(Arc<Vm>),
    /// Not listed (unreadable for the model, or naming another id), but what it holds
    /// stays reserved.
    Reserved {
        ip: Ipv4Addr,
        ports: Vec<u16>,
        why: String,
    },
    /// Not even its guest IP can be read: creates are refused while it is there.
    Unreadable(String),
}

/// A dir's meta.json read again.
enum Load {
    Unchanged,
    Loaded(Record),
    Gone,
}

impl Index {
    /// Read every VM dir under `root`. Followed with inotify when the host allows it;
    /// otherwise by stamps, which is slower with many VMs and says so.
    pub fn load(root: &Path) -> io::Result<Index> {
        let follow = match Inotify::init() {
            Ok(inotify) => Follow::Inotify {
                inotify,
                dirs: VmDirs::new(root),
                buf: vec![0; 64 * 1024],
            },
            Err(e) => {
                log::warn!(error:% = e; "no inotify instance (fs.inotify.max_user_instances?): every create and list checks every meta.json");
                Follow::Stamps
            }
        };
        Index::with(root, follow)
    }

    fn with(root: &Path, follow: Follow) -> io::Result<Index> {
        let index = Index {
            root: root.to_path_buf(),
            inner: Mutex::new(Inner {
                follow,
                records: HashMap::new(),
                taken: Taken::default(),
                unreadable: BTreeMap::new(),
                view: None,
            }),
        };
        index.rescan(&mut index.lock())?;
        Ok(index)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index, current: every change completed before this call is in it.
    fn current(&self) -> io::Result<MutexGuard<'_, Inner>> {
        let mut inner = self.lock();
        let (rescan, dirty) = match &mut inner.follow {
            Follow::Inotify { inotify, dirs, buf } => {
                let (events, lost) = mergen_watch::drain(inotify, buf);
                let mut changes = mergen_watch::Changes::default();
                if lost || !events.is_empty() {
                    changes = dirs.apply(&mut inotify.watches(), events, lost);
                }
                let unwatched: Vec<String> = dirs.unwatched().map(String::from).collect();
                (
                    changes.rescan || !dirs.watches_root(),
                    (changes.dirs, unwatched),
                )
            }
            Follow::Stamps => (true, Default::default()),
        };
        if rescan {
            self.rescan(&mut inner)?;
        } else {
            let (events, mut unwatched) = dirty;
            // Files that could not be read send no event when they can be again.
            unwatched.extend(
                inner
                    .records
                    .iter()
                    .filter(|(_, r)| r.stamp.is_none())
                    .map(|(name, _)| name.clone()),
            );
            // Named by an event: read whatever its stamp says (an in-place rewrite can
            // keep size and times within the clock's granularity).
            for name in events {
                self.reload(&mut inner, name, false);
            }
            for name in unwatched {
                self.reload(&mut inner, name, true);
            }
        }
        Ok(inner)
    }

    /// Read the whole root again; files whose stamp did not change are kept as read.
    fn rescan(&self, inner: &mut Inner) -> io::Result<()> {
        if let Follow::Inotify { inotify, dirs, .. } = &mut inner.follow {
            // Before listing: a dir that comes later is an event.
            dirs.watch_root(&mut inotify.watches());
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name();
            if let Some(name) = name.to_str().filter(|n| is_valid_id(n)) {
                names.push(name.to_string());
            }
        }
        if let Follow::Inotify { inotify, dirs, .. } = &mut inner.follow {
            // Before reading: a change after the read is an event.
            dirs.watch_listing(&mut inotify.watches(), &names);
        }
        let mut old = std::mem::take(&mut inner.records);
        inner.taken = Taken::default();
        inner.unreadable.clear();
        let work: Vec<(String, Option<Record>)> = names
            .into_iter()
            .map(|n| {
                let known = old.remove(&n);
                (n, known)
            })
            .collect();
        let root = &self.root;
        let loaded = mergen_watch::map_parallel(work, |(name, known)| {
            let load = load(root, &name, known.as_ref().and_then(|r| r.stamp));
            (name, known, load)
        });
        for (name, known, load) in loaded {
            let record = match load {
                Load::Unchanged => known,
                Load::Loaded(r) => Some(r),
                Load::Gone => None,
            };
            if let Some(r) = record {
                inner.put(name, r);
            }
        }
        inner.view = None;
        Ok(())
    }

    /// Read one dir's meta.json again (`by_stamp`: only if its stamp changed).
    fn reload(&self, inner: &mut Inner, name: String, by_stamp: bool) {
        if !is_valid_id(&name) {
            return;
        }
        let known = match by_stamp {
            true => inner.records.get(&name).and_then(|r| r.stamp),
            false => None,
        };
        match load(&self.root, &name, known) {
            Load::Unchanged => return,
            Load::Loaded(r) => inner.put(name, r),
            Load::Gone => {
                inner.take(&name);
            }
        }
        inner.view = None;
    }

    /// Every whole VM, newest first.
    pub fn view(&self) -> io::Result<View> {
        let mut inner = self.current()?;
        if let Some(v) = &inner.view {
            return Ok(Arc::clone(v));
        }
        let mut vms: Vec<Arc<Vm>> = inner
            .records
            .values()
            .filter_map(|r| match &r.kind {
                Kind::Vm(vm) => Some(Arc::clone(vm)),
                _ => None,
            })
            .collect();
        vms.sort_by(|a, b| {
            b.meta
                .created_at
                .cmp(&a.meta.created_at)
                .then_with(|| a.meta.id.cmp(&b.meta.id))
        });
        let view: View = vms.into();
        inner.view = Some(Arc::clone(&view));
        Ok(view)
    }

    /// Run `f` (an allocation) on the guest IPs and host ports every VM dir holds,
    /// including those whose meta.json the model cannot read, kept up to date as
    /// records change. An error names a meta.json that is not even JSON with a guest
    /// IP: the addresses it holds are unknown, so nothing may be handed out. The caller
    /// holds the allocation lock, so no other mergend changes the store until it has
    /// written its VM.
    pub fn allocate<T>(&self, f: impl FnOnce(&Taken) -> T) -> Result<T, String> {
        let inner = self
            .current()
            .map_err(|e| format!("listing {}: {e}", self.root.display()))?;
        // The first by name, so that the answer does not change between calls.
        if let Some(why) = inner.unreadable.values().next() {
            return Err(why.clone());
        }
        Ok(f(&inner.taken))
    }

    /// Entries named like a VM that are not listed (a meta.json that cannot be read
    /// or names another id, or none at all), by name.
    pub fn unlisted(&self) -> io::Result<Vec<Unlisted>> {
        let inner = self.current()?;
        let mut out: Vec<Unlisted> = inner
            .records
            .iter()
            .filter_map(|(name, r)| {
                let why = match &r.kind {
                    Kind::Vm(_) => return None,
                    Kind::Reserved { why, .. } | Kind::Unreadable(why) => why.clone(),
                };
                Some(Unlisted {
                    dir: self.root.join(name),
                    why,
                })
            })
            .collect();
        // Without a meta.json they hold nothing and have no record: look for them.
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name();
            if let Some(name) = name.to_str().filter(|n| is_valid_id(n)) {
                if !inner.records.contains_key(name) {
                    out.push(Unlisted {
                        dir: self.root.join(name),
                        why: format!("no {META_FILE}"),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(out)
    }
}

/// Read `<root>/<name>/meta.json` unless `known` stamps its current version.
fn load(root: &Path, name: &str, known: Option<Stamp>) -> Load {
    let path = root.join(name).join(META_FILE);
    let (stamp, bytes) = match read_changed(&path, known) {
        Read::Unchanged => return Load::Unchanged,
        // No meta.json: not a VM mergend made, nothing to reserve.
        Read::Missing => return Load::Gone,
        Read::Changed { stamp, bytes } => (stamp, bytes),
        Read::Failed(e) => {
            return Load::Loaded(Record {
                stamp: None,
                kind: Kind::Unreadable(format!(
                    "{}: {e}: the guest IP and host ports it holds are unknown: fix or remove it before creating VMs",
                    path.display()
                )),
            })
        }
    };
    let kind = match Meta::from_slice(&bytes) {
        Ok(meta) if meta.id == name => Kind::Vm(Arc::new(Vm::new(meta))),
        Ok(meta) => {
            let why = format!("meta.json names another id ({})", meta.id);
            log::warn!(file:? = path, guest_ip:% = meta.guest_ip; "{why}: not listed, its guest IP and ports stay reserved");
            Kind::Reserved {
                ip: meta.guest_ip,
                ports: meta.ports.iter().map(|p| p.host).collect(),
                why,
            }
        }
        Err(e) => match scan_reservations(&bytes) {
            Ok((ip, ports)) => {
                log::warn!(file:? = path, error:% = e, guest_ip:% = ip; "meta.json unreadable: not listed, its guest IP and ports stay reserved");
                Kind::Reserved {
                    ip,
                    ports,
                    why: format!("meta.json unreadable: {e}"),
                }
            }
            Err(why) => {
                log::warn!(file:? = path, error:% = e; "meta.json unreadable, and so is its guest IP: creates are refused until it is fixed");
                Kind::Unreadable(format!(
                    "{} cannot be read ({why}; {e}), so the guest IP and host ports it holds are unknown: fix or remove it before creating VMs",
                    path.display()
                ))
            }
        },
    };
    Load::Loaded(Record {
        stamp: Some(stamp),
        kind,
    })
}

/// `guestIP` and every `ports[].host` of a meta.json the model cannot read.
fn scan_reservations(bytes: &[u8]) -> Result<(Ipv4Addr, Vec<u16>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let ip = v
        .get("guestIP")
        .and_then(|ip| ip.as_str())
        .and_then(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .ok_or("no readable guestIP")?;
    let ports = v
        .get("ports")
        .and_then(|p| p.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|p| p.get("host")?.as_u64())
                .filter_map(|h| u16::try_from(h).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok((ip, ports))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::fs;

    use mergen_model::{PortBinding, Protocol};
    use mergen_testkit::TempDir;

    use super::*;

    fn id(n: u32) -> String {
        format!("{n:08x}-0000-4000-8000-{n:012x}")
    }

    fn meta(n: u32, ip: [u8; 4], port: u16) -> Meta {
        Meta {
            created_at: time::OffsetDateTime::from_unix_timestamp(1_780_000_000 + i64::from(n))
                .unwrap(),
            kernel: String::new(),
            ports: vec![PortBinding {
                guest: 80,
                host: port,
                protocol: Protocol::Tcp,
            }],
            guest_ip: Ipv4Addr::from(ip),
            ..crate::sample::meta(&id(n))
        }
    }

    /// A VM dir committed as mergend commits one: built aside, renamed into place.
    fn commit(root: &Path, m: &Meta) {
        let tmp = root.join(format!(".tmp-{}", m.id));
        fs::create_dir(&tmp).unwrap();
        mergen_model::atomic::write_json(&tmp.join(META_FILE), m).unwrap();
        fs::rename(&tmp, root.join(&m.id)).unwrap();
    }

    fn listed(index: &Index) -> Vec<String> {
        index
            .view()
            .unwrap()
            .iter()
            .map(|vm| vm.meta.id.clone())
            .collect()
    }

    fn taken(index: &Index) -> Result<Taken, String> {
        index.allocate(|t| t.clone())
    }

    fn ips(index: &Index) -> HashSet<Ipv4Addr> {
        taken(index).unwrap().ip_set()
    }

    /// An index following inotify, and one checking stamps (a host without inotify
    /// instances to spare), with whether it sees in-place rewrites that keep the size
    /// within the clock's granularity (stamps cannot, on kernels with coarse times).
    fn both_ways(root: &Path) -> [(Index, bool); 2] {
        [
            (Index::load(root).unwrap(), true),
            (Index::with(root, Follow::Stamps).unwrap(), false),
        ]
    }

    /// Whatever another process does to the files is in the very next answer: no
    /// waiting, whether the index follows inotify or checks stamps.
    #[test]
    fn changes_behind_its_back_are_in_the_next_answer() {
        let dir = TempDir::new("ctl-index");
        let root = dir.path();
        commit(root, &meta(1, [10, 0, 0, 2], 20000));
        for (index, exact) in both_ways(root) {
            assert_eq!(listed(&index), [id(1)]);

            // Added.
            commit(root, &meta(2, [10, 0, 0, 3], 20001));
            assert_eq!(listed(&index), [id(2), id(1)], "newest first");
            let held = taken(&index).unwrap();
            assert!(held.port_set().contains(&20001));

            // Edited in place (the same size: 10.0.0.3 → 10.0.0.4, where an event is
            // needed), then replaced atomically.
            let path = root.join(id(2)).join(META_FILE);
            let text = fs::read_to_string(&path).unwrap();
            let edited = if exact { "10.0.0.4" } else { "10.0.0.44" };
            fs::write(&path, text.replace("10.0.0.3", edited)).unwrap();
            assert_eq!(
                ips(&index),
                [Ipv4Addr::new(10, 0, 0, 2), edited.parse().unwrap()].into()
            );
            mergen_model::atomic::write_json(&path, &meta(2, [10, 0, 0, 9], 20001)).unwrap();
            assert!(ips(&index).contains(&Ipv4Addr::new(10, 0, 0, 9)));

            // Removed as mergend removes: renamed away, then deleted.
            let gone = root.join(format!(".del-{}", id(2)));
            fs::rename(root.join(id(2)), &gone).unwrap();
            fs::remove_dir_all(&gone).unwrap();
            assert_eq!(listed(&index), [id(1)]);
            assert_eq!(ips(&index), [Ipv4Addr::new(10, 0, 0, 2)].into());

            // A dir made empty, its meta.json written into it afterwards (a tool, by hand).
            let m3 = meta(3, [10, 0, 0, 5], 20002);
            fs::create_dir(root.join(&m3.id)).unwrap();
            assert_eq!(listed(&index), [id(1)]);
            fs::write(
                root.join(&m3.id).join(META_FILE),
                serde_json::to_vec(&m3).unwrap(),
            )
            .unwrap();
            assert_eq!(listed(&index), [id(3), id(1)]);
            fs::remove_dir_all(root.join(&m3.id)).unwrap();
            assert_eq!(listed(&index), [id(1)]);
        }
    }

    /// A damaged meta.json still holds its addresses; one without a readable guest IP
    /// refuses creates (naming it) until it is fixed; neither is listed.
    #[test]
    fn damaged_files_keep_their_addresses() {
        let dir = TempDir::new("ctl-index-damaged");
        let root = dir.path();
        commit(root, &meta(1, [10, 0, 0, 2], 20000));
        for (index, _) in both_ways(root) {
            let bad = root.join(id(7));
            fs::create_dir_all(&bad).unwrap();
            // A port protocol the model does not know, and a field of the wrong type.
            fs::write(
                bad.join(META_FILE),
                br#"{"id":"x","guestIP":" 10.0.0.7 ","createdAt":5,"ports":[{"guest":1,"host":20007,"protocol":"sctp"}]}"#,
            )
            .unwrap();
            let held = taken(&index).unwrap();
            assert!(held.ip_set().contains(&Ipv4Addr::new(10, 0, 0, 7)));
            assert!(held.port_set().contains(&20007));
            assert_eq!(listed(&index), [id(1)]);
            let unlisted = index.unlisted().unwrap();
            assert_eq!(unlisted.len(), 1);
            assert_eq!(unlisted[0].dir, bad);
            // A dir without a meta.json holds nothing, and is reported too.
            let empty = root.join(id(9));
            fs::create_dir(&empty).unwrap();
            let unlisted = index.unlisted().unwrap();
            assert_eq!(
                unlisted.iter().map(|u| &u.dir).collect::<Vec<_>>(),
                [&bad, &empty]
            );
            assert_eq!(unlisted[1].why, "no meta.json");
            fs::remove_dir(&empty).unwrap();

            // Another VM's record in this dir: its addresses stay reserved too.
            mergen_model::atomic::write_json(&bad.join(META_FILE), &meta(8, [10, 0, 0, 8], 20008))
                .unwrap();
            assert!(ips(&index).contains(&Ipv4Addr::new(10, 0, 0, 8)));
            assert_eq!(listed(&index), [id(1)]);

            fs::write(bad.join(META_FILE), b"{\"id\": \"half-writ").unwrap();
            let err = taken(&index).unwrap_err();
            assert!(
                err.contains(&bad.join(META_FILE).display().to_string()),
                "{err}"
            );
            assert_eq!(listed(&index), [id(1)]);

            mergen_model::atomic::write_json(&bad.join(META_FILE), &meta(7, [10, 0, 0, 7], 20007))
                .unwrap();
            assert!(ips(&index).contains(&Ipv4Addr::new(10, 0, 0, 7)));
            assert_eq!(listed(&index), [id(7), id(1)]);
            fs::remove_dir_all(&bad).unwrap();
            assert_eq!(listed(&index), [id(1)]);
        }
    }

    /// Two indexes on one root (two mergends): each sees what the other's side wrote.
    #[test]
    fn two_indexes_on_one_root_agree() {
        let dir = TempDir::new("ctl-index-two");
        let root = dir.path();
        let a = Index::load(root).unwrap();
        let b = Index::load(root).unwrap();
        for n in 0..50u32 {
            let ip = [10, 0, (n / 200) as u8, (n % 200) as u8 + 2];
            let (writer, reader) = if n % 2 == 0 { (&a, &b) } else { (&b, &a) };
            // What each would allocate from sees the other's last write.
            assert_eq!(taken(writer).unwrap().ip_set().len(), n as usize);
            commit(root, &meta(n, ip, 20000 + n as u16));
            assert!(taken(reader)
                .unwrap()
                .ip_set()
                .contains(&Ipv4Addr::from(ip)));
        }
        assert_eq!(listed(&a), listed(&b));
        assert_eq!(listed(&a).len(), 50);
    }

    /// More events than the kernel queues (fs.inotify.max_queued_events, 16,384 by
    /// default) are lost as a whole: the next answer rescans and misses nothing.
    #[test]
    fn a_lost_event_queue_means_a_rescan() {
        let dir = TempDir::new("ctl-index-overflow");
        let root = dir.path();
        commit(root, &meta(1, [10, 0, 0, 2], 20000));
        let index = Index::load(root).unwrap();
        let queued: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(16_384);
        // Each file made and removed in a watched dir queues two events.
        let noise = root.join(id(1));
        for i in 0..queued / 2 + 16 {
            let f = noise.join(format!("noise-{i}"));
            fs::write(&f, b"").unwrap();
            fs::remove_file(&f).unwrap();
        }
        commit(root, &meta(2, [10, 0, 0, 3], 20001));
        assert_eq!(listed(&index), [id(2), id(1)]);
        commit(root, &meta(3, [10, 0, 0, 4], 20002));
        assert_eq!(listed(&index), [id(3), id(2), id(1)], "followed afterwards");
    }
}
