//! mergend's side: this host's VMs in etcd.
//!
//! A keeper thread holds a lease (granted with the configured TTL, renewed every third
//! of it) and, whenever it gets a new one (start-up, or after etcd lost the old one in
//! an outage), publishes every local VM again from the local store, which stays the
//! source of truth: it claims their aliases, writes their routes, and removes what this
//! host wrote earlier and no longer has. Lifecycle calls publish and withdraw single
//! VMs through [`Ops`], under the same lock, so a create never races a re-publish.
//!
//! Claims are decided by etcd: a transaction compares every alias key with what was
//! read (absent, or held by this host) and writes them all, or nothing; when another
//! host got there first, the comparison fails and the claim is read again.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use time::OffsetDateTime;

use crate::{ClusterError, Etcd, HostRecord, Keys, Settings, VmRecord};

/// How often a claim is tried again when other hosts keep changing its keys.
const CLAIM_ATTEMPTS: usize = 8;
/// Keys deleted per transaction when cleaning up (etcd allows 128 operations).
const DELETE_CHUNK: usize = 64;
/// Largest answer a full read may get (gRPC's default, 4 MiB, is about 10,000 VMs).
const MAX_READ: usize = 256 << 20;

/// A VM of this host, as the local store has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVm {
    pub id: String,
    /// Every alias it answers to (`mergen_model::aliases`).
    pub aliases: Vec<String>,
    pub created_at: OffsetDateTime,
}

/// Every VM of this host, read from the local store when the keeper publishes all.
pub type Source = Box<dyn Fn() -> Result<Vec<LocalVm>, String> + Send + Sync>;

/// What the keeper did last, for `/metrics` and `/healthz`.
#[derive(Debug, Default)]
pub struct PublisherStatus {
    connected: AtomicBool,
    lease: AtomicI64,
    republishes: AtomicU64,
    routes: AtomicU64,
    conflicts: AtomicU64,
}

impl PublisherStatus {
    /// Whether this host holds a live lease (its routes are published).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// The current lease, 0 when none.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }
    /// How many times every route was published (start-up and each new lease).
    pub fn republishes(&self) -> u64 {
        self.republishes.load(Ordering::Relaxed)
    }
    /// Routes published by the last full publish and the calls since.
    pub fn routes(&self) -> u64 {
        self.routes.load(Ordering::Relaxed)
    }
    /// Aliases of local VMs held by another host at the last full publish.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }
}

struct Wanted {
    aliases: Vec<String>,
    created_at: OffsetDateTime,
}

struct State {
    lease: Option<i64>,
    /// Every local VM (claimed, published, or being created), by id.
    local: HashMap<String, Wanted>,
    /// Something could not be written or removed: publish everything again at the
    /// next renewal.
    dirty: bool,
}

struct Inner {
    etcd: Etcd,
    keys: Keys,
    host: HostRecord,
    ttl: Duration,
    source: Source,
    state: Mutex<State>,
    status: Arc<PublisherStatus>,
}

/// This host's publisher. Dropping it stops renewing the lease (the routes then go
/// with it after the TTL, unless a new mergend renews them first).
pub struct Publisher {
    inner: Arc<Inner>,
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
}

impl Publisher {
    /// Connect and start the keeper. Returns at once: an etcd that is down now is
    /// retried in the background (lifecycle calls that need it answer unavailable).
    pub fn start(
        settings: &Settings,
        host: HostRecord,
        ttl: Duration,
        source: Source,
    ) -> Result<Publisher, ClusterError> {
        let etcd = Etcd::connect(settings, "mergen-etcd")?;
        let inner = Arc::new(Inner {
            etcd,
            keys: settings.keys(),
            host,
            ttl: ttl.max(Duration::from_secs(1)),
            source,
            state: Mutex::new(State {
                lease: None,
                local: HashMap::new(),
                dirty: false,
            }),
            status: Arc::default(),
        });
        let (stop, stopped) = mpsc::channel();
        let keeper = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("mergen-lease".into())
                .spawn(move || keep(&inner, &stopped))
                .map_err(ClusterError::Start)?
        };
        Ok(Publisher {
            inner,
            stop: Some(stop),
            keeper: Some(keeper),
        })
    }

    pub fn host(&self) -> &HostRecord {
        &self.inner.host
    }

    pub fn status(&self) -> Arc<PublisherStatus> {
        Arc::clone(&self.inner.status)
    }

    /// Take the publisher's lock for a lifecycle call: what it claims, writes and
    /// withdraws cannot interleave with another call's or with a full publish.
    pub fn lock(&self) -> Ops<'_> {
        Ops {
            inner: &self.inner,
            state: self.inner.state.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Every VM of the cluster, as etcd has it now.
    pub fn list(&self) -> Result<Vec<VmRecord>, ClusterError> {
        let prefix = self.inner.keys.vms();
        let resp = self.inner.etcd.call(|c| {
            let prefix = prefix.clone();
            async move {
                c.kv_client()
                    .max_decoding_message_size(MAX_READ)
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            }
        })?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<VmRecord>(kv.value()).ok())
            .collect())
    }

    /// The VM `id` wherever it is, if any host publishes it.
    pub fn find(&self, id: &str) -> Result<Option<VmRecord>, ClusterError> {
        let key = self.inner.keys.vm(id);
        let resp = self.inner.etcd.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<VmRecord>(kv.value()).ok()))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

/// The publisher's lock, held for one lifecycle call.
pub struct Ops<'a> {
    inner: &'a Inner,
    state: MutexGuard<'a, State>,
}

impl Ops<'_> {
    /// Claim `aliases` for the new VM `id` before it is written: all of them, or
    /// [`ClusterError::AliasTaken`] naming one that a VM of another host holds.
    pub fn claim(&mut self, id: &str, aliases: &[String]) -> Result<(), ClusterError> {
        let lease = self.lease()?;
        let mut states = HashMap::new();
        let held = self
            .inner
            .claim(lease, aliases, &mut states, true, Vec::new())?;
        debug_assert_eq!(held.len(), aliases.len());
        self.state.local.insert(
            id.to_string(),
            Wanted {
                aliases: aliases.to_vec(),
                created_at: OffsetDateTime::now_utc(),
            },
        );
        Ok(())
    }

    /// Publish the route of `vm`, whose aliases were claimed.
    pub fn publish(&mut self, vm: &LocalVm) -> Result<(), ClusterError> {
        self.state.local.insert(
            vm.id.clone(),
            Wanted {
                aliases: vm.aliases.clone(),
                created_at: vm.created_at,
            },
        );
        let lease = match self.lease() {
            Ok(l) => l,
            Err(e) => {
                self.state.dirty = true;
                return Err(e);
            }
        };
        let record = self.inner.record(&vm.id, vm.aliases.clone(), vm.created_at);
        let key = self.inner.keys.vm(&vm.id);
        let value = record.to_json();
        let put = self.inner.etcd.call(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        });
        match put {
            Ok(_) => {
                self.inner.status.routes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.state.dirty = true;
                Err(e)
            }
        }
    }

    /// Remove the route of `id` (deleted, or never created after its claim) and give
    /// up the aliases no other local VM answers to. The local record goes at once;
    /// what cannot be removed from etcd now is removed at the next renewal.
    pub fn withdraw(&mut self, id: &str) -> Result<(), ClusterError> {
        let Some(gone) = self.state.local.remove(id) else {
            return Ok(());
        };
        let still: BTreeSet<&str> = self
            .state
            .local
            .values()
            .flat_map(|w| w.aliases.iter().map(String::as_str))
            .collect();
        let release: Vec<String> = gone
            .aliases
            .into_iter()
            .filter(|a| !still.contains(a.as_str()))
            .collect();
        if self.state.lease.is_none() {
            self.state.dirty = true;
            return Err(ClusterError::Unavailable("no lease".into()));
        }
        let mut ops = vec![TxnOp::delete(self.inner.keys.vm(id), None)];
        ops.extend(self.inner.release_ops(&release));
        match self.inner.etcd.call(|mut c| {
            let ops = ops.clone();
            async move { c.txn(Txn::new().and_then(ops)).await }
        }) {
            Ok(_) => {
                let routes = &self.inner.status.routes;
                let _ = routes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
                Ok(())
            }
            Err(e) => {
                self.state.dirty = true;
                Err(e)
            }
        }
    }

    fn lease(&self) -> Result<i64, ClusterError> {
        self.state.lease.ok_or_else(|| {
            ClusterError::Unavailable("this host holds no lease (etcd unreachable)".into())
        })
    }
}

impl Inner {
    fn record(&self, id: &str, aliases: Vec<String>, created_at: OffsetDateTime) -> VmRecord {
        VmRecord {
            id: id.to_string(),
            host: self.host.name.clone(),
            addr: self.host.addr.clone(),
            aliases,
            created_at,
        }
    }

    /// Claim `aliases` (bound to `lease`) in one transaction, together with `extra`.
    /// `states` holds what is known of each alias key (`None`: absent; read when not
    /// known). `strict`: an alias held by another host fails the claim; otherwise it
    /// is skipped. Returns the aliases claimed.
    fn claim(
        &self,
        lease: i64,
        aliases: &[String],
        states: &mut HashMap<String, Option<String>>,
        strict: bool,
        extra: Vec<TxnOp>,
    ) -> Result<Vec<String>, ClusterError> {
        let me = self.host.name.as_str();
        let unknown: Vec<&String> = aliases
            .iter()
            .filter(|a| !states.contains_key(*a))
            .collect();
        if !unknown.is_empty() {
            let gets: Vec<TxnOp> = unknown
                .iter()
                .map(|a| TxnOp::get(self.keys.alias(a), None))
                .collect();
            let resp = self.etcd.call(|mut c| {
                let gets = gets.clone();
                async move { c.txn(Txn::new().and_then(gets)).await }
            })?;
            read_states(
                &self.keys,
                &resp.op_responses(),
                unknown.iter().map(|a| a.as_str()),
                states,
            );
        }
        for _ in 0..CLAIM_ATTEMPTS {
            let mut compares = Vec::new();
            let mut claimed = Vec::new();
            for alias in aliases {
                let key = self.keys.alias(alias);
                match states.get(alias).cloned().flatten() {
                    None => compares.push(Compare::create_revision(key, CompareOp::Equal, 0)),
                    Some(owner) if owner == me => {
                        compares.push(Compare::value(key, CompareOp::Equal, me))
                    }
                    Some(owner) if strict => {
                        return Err(ClusterError::AliasTaken {
                            alias: alias.clone(),
                            host: owner,
                        })
                    }
                    Some(_) => continue,
                }
                claimed.push(alias.clone());
            }
            let mut puts: Vec<TxnOp> = claimed
                .iter()
                .map(|a| {
                    TxnOp::put(
                        self.keys.alias(a),
                        me,
                        Some(PutOptions::new().with_lease(lease)),
                    )
                })
                .collect();
            puts.extend(extra.iter().cloned());
            let reread: Vec<TxnOp> = claimed
                .iter()
                .map(|a| TxnOp::get(self.keys.alias(a), None))
                .collect();
            let txn = Txn::new().when(compares).and_then(puts).or_else(reread);
            let resp = self.etcd.call(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })?;
            if resp.succeeded() {
                return Ok(claimed);
            }
            // Someone changed a key since it was read: what it holds now decides.
            read_states(
                &self.keys,
                &resp.op_responses(),
                claimed.iter().map(String::as_str),
                states,
            );
        }
        Err(ClusterError::Unavailable(format!(
            "the claim on {aliases:?} kept changing under {CLAIM_ATTEMPTS} attempts"
        )))
    }

    /// Delete each of `aliases` if this host still holds it.
    fn release_ops(&self, aliases: &[String]) -> Vec<TxnOp> {
        aliases
            .iter()
            .map(|a| {
                let key = self.keys.alias(a);
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value(
                            key.clone(),
                            CompareOp::Equal,
                            self.host.name.as_str(),
                        )])
                        .and_then([TxnOp::delete(key, None)]),
                )
            })
            .collect()
    }

    /// Publish everything again under `lease`: the local store decides what this host
    /// has. Returns the number of routes published.
    fn republish(&self, state: &mut State, lease: i64) -> Result<usize, ClusterError> {
        match (self.source)() {
            Ok(vms) => {
                state.local = vms
                    .into_iter()
                    .map(|vm| {
                        let w = Wanted {
                            aliases: vm.aliases,
                            created_at: vm.created_at,
                        };
                        (vm.id, w)
                    })
                    .collect();
            }
            // The VMs known from this run stay published.
            Err(e) => log::warn!(error = e; "cannot list the local VMs; publishing those known"),
        }
        let me = self.host.name.as_str();
        let (vm_prefix, alias_prefix) = (self.keys.vms(), self.keys.aliases());
        let resp = self.etcd.call(|c| {
            let (vm_prefix, alias_prefix) = (vm_prefix.clone(), alias_prefix.clone());
            async move {
                let mut kv = c.kv_client().max_decoding_message_size(MAX_READ);
                let vms = kv
                    .get(vm_prefix, Some(GetOptions::new().with_prefix()))
                    .await?;
                let aliases = kv
                    .get(alias_prefix, Some(GetOptions::new().with_prefix()))
                    .await?;
                Ok((vms, aliases))
            }
        })?;
        let (vms, aliases) = resp;
        let mut states: HashMap<String, Option<String>> = HashMap::new();
        for kv in aliases.kvs() {
            if let (Ok(key), Ok(owner)) = (kv.key_str(), kv.value_str()) {
                if let Some(crate::Key::Alias(a)) = self.keys.parse(key) {
                    states.insert(a.to_string(), Some(owner.to_string()));
                }
            }
        }
        let mut ours_before: Vec<String> = Vec::new();
        for kv in vms.kvs() {
            if let Ok(rec) = serde_json::from_slice::<VmRecord>(kv.value()) {
                if rec.host == me {
                    ours_before.push(rec.id);
                }
            }
        }

        let mut conflicts = 0u64;
        let mut ids: Vec<&String> = state.local.keys().collect();
        ids.sort();
        for id in ids {
            let wanted = &state.local[id];
            // Aliases of other local VMs count as absent here until claimed, so read
            // fresh each time (`states` is updated by each claim's outcome).
            let record_for = |held: Vec<String>| self.record(id, held, wanted.created_at);
            // The route goes in the same transaction as the claims, with the aliases
            // that were claimed: first try them all.
            let mut want = wanted.aliases.clone();
            let held = loop {
                let guess = record_for(
                    want.iter()
                        .filter(|a| states.get(*a).cloned().flatten().is_none_or(|o| o == me))
                        .cloned()
                        .collect(),
                );
                let put = TxnOp::put(
                    self.keys.vm(id),
                    guess.to_json(),
                    Some(PutOptions::new().with_lease(lease)),
                );
                let held = self.claim(lease, &want, &mut states, false, vec![put])?;
                if held == guess.aliases {
                    break held;
                }
                // The claim skipped an alias the guess had: write the route again
                // with exactly what was claimed.
                want = held;
            };
            for a in &held {
                states.insert(a.clone(), Some(me.to_string()));
            }
            let lost = wanted.aliases.len() - held.len();
            if lost > 0 {
                conflicts += lost as u64;
                let taken: Vec<&String> = wanted
                    .aliases
                    .iter()
                    .filter(|a| !held.contains(a))
                    .collect();
                log::warn!(id = id.as_str(), aliases:? = taken; "aliases held by another host: this VM answers to them on this host only");
            }
        }

        // What this host wrote before and has no more.
        let wanted: BTreeSet<&str> = state
            .local
            .values()
            .flat_map(|w| w.aliases.iter().map(String::as_str))
            .collect();
        let stale_aliases: Vec<String> = states
            .iter()
            .filter(|(a, owner)| owner.as_deref() == Some(me) && !wanted.contains(a.as_str()))
            .map(|(a, _)| a.clone())
            .collect();
        let mut deletes: Vec<TxnOp> = ours_before
            .iter()
            .filter(|id| !state.local.contains_key(*id))
            .map(|id| TxnOp::delete(self.keys.vm(id), None))
            .collect();
        deletes.extend(self.release_ops(&stale_aliases));
        for chunk in deletes.chunks(DELETE_CHUNK) {
            self.etcd.call(|mut c| {
                let ops = chunk.to_vec();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })?;
        }
        let (key, host) = (self.keys.host(me), self.host.to_json());
        self.etcd.call(|mut c| {
            let (key, host) = (key.clone(), host.clone());
            async move {
                c.put(key, host, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })?;
        self.status.conflicts.store(conflicts, Ordering::Relaxed);
        Ok(state.local.len())
    }
}

/// Fill `states` for `aliases` from the answers of one `get` per alias, in order.
fn read_states<'a>(
    keys: &Keys,
    answers: &[TxnOpResponse],
    aliases: impl Iterator<Item = &'a str>,
    states: &mut HashMap<String, Option<String>>,
) {
    for (alias, answer) in aliases.zip(answers) {
        let owner = match answer {
            TxnOpResponse::Get(g) => g
                .kvs()
                .iter()
                .find(|kv| kv.key() == keys.alias(alias).as_bytes())
                .and_then(|kv| kv.value_str().ok())
                .map(str::to_string),
            _ => None,
        };
        states.insert(alias.to_string(), owner);
    }
}

/// The keeper thread: hold a lease, publish everything whenever it is new, renew it
/// every third of its TTL, and start over when it is lost.
fn keep(inner: &Inner, stopped: &mpsc::Receiver<()>) {
    let ttl_secs = inner.ttl.as_secs().max(1) as i64;
    let renew = inner.ttl / 3;
    let mut backoff = Duration::from_millis(200);
    // What this outage's log said (`outage_level`); 0: nothing.
    let mut warned = 0;
    let wait =
        |d: Duration| -> bool { matches!(stopped.recv_timeout(d), Err(RecvTimeoutError::Timeout)) };
    loop {
        let lease = inner
            .etcd
            .call(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .map(|r| r.id());
        let lease = match lease {
            Ok(l) => l,
            Err(e) => {
                let level = crate::outage_level(&e.to_string());
                if level > warned {
                    log::warn!(error:% = e; "etcd unreachable: this host's routes are not published; retrying");
                    warned = level;
                }
                if !wait(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(renew.max(Duration::from_millis(200)));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        {
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            state.lease = Some(lease);
            inner.status.lease.store(lease, Ordering::Relaxed);
            match inner.republish(&mut state, lease) {
                Ok(n) => {
                    state.dirty = false;
                    warned = 0;
                    inner.status.routes.store(n as u64, Ordering::Relaxed);
                    inner.status.republishes.fetch_add(1, Ordering::Relaxed);
                    inner.status.connected.store(true, Ordering::Relaxed);
                    log::info!(lease = lease, routes = n, host = inner.host.name.as_str(); "published this host's routes to etcd");
                }
                Err(e) => {
                    state.dirty = true;
                    log::warn!(error:% = e; "publishing this host's routes failed; retrying at the next renewal");
                }
            }
        }
        if !renew_until_lost(inner, lease, renew, &wait) {
            return;
        }
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.lease = None;
        inner.status.lease.store(0, Ordering::Relaxed);
        inner.status.connected.store(false, Ordering::Relaxed);
        log::warn!(lease = lease; "lease lost: this host's routes are gone from etcd until it is back");
    }
}

/// Renew `lease` until it is lost (false: told to stop).
fn renew_until_lost(
    inner: &Inner,
    lease: i64,
    every: Duration,
    wait: &dyn Fn(Duration) -> bool,
) -> bool {
    let mut stream = None;
    let mut last_ok = Instant::now();
    loop {
        if !wait(every) {
            return false;
        }
        if stream.is_none() {
            let mut c = inner.etcd.client.clone();
            stream = inner
                .etcd
                .call_once(async move { c.lease_keep_alive(lease).await })
                .ok();
        }
        let answer = match stream.as_mut() {
            Some((keeper, responses)) => inner.etcd.call_once(async move {
                keeper.keep_alive().await?;
                responses.message().await
            }),
            None => Err(ClusterError::Unavailable("no keep-alive stream".into())),
        };
        match answer {
            Ok(Some(r)) if r.ttl() > 0 => {
                last_ok = Instant::now();
                inner.status.connected.store(true, Ordering::Relaxed);
                // A lifecycle call may hold the lock for a while (a slow disk): the
                // renewal never waits for it, and a dirty state waits for the next.
                let mut state = match inner.state.try_lock() {
                    Ok(s) => s,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => continue,
                };
                if state.dirty {
                    match inner.republish(&mut state, lease) {
                        Ok(n) => {
                            state.dirty = false;
                            inner.status.routes.store(n as u64, Ordering::Relaxed);
                            inner.status.republishes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log::warn!(error:% = e; "publishing this host's routes failed; retrying")
                        }
                    }
                }
            }
            // etcd says the lease is gone (it expired during an outage).
            Ok(Some(_)) => return true,
            Ok(None) | Err(_) => {
                stream = None;
                inner.status.connected.store(false, Ordering::Relaxed);
                if last_ok.elapsed() >= inner.ttl {
                    return true;
                }
            }
        }
    }
}
