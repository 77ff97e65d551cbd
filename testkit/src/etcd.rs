//! A real etcd cluster for tests (Debian's `etcd-server`): members on loopback or on an
//! address inside a test's network namespace, each one stopped and started again at
//! will, all of them killed by PID and their data removed on drop. Members may serve
//! their clients over TLS, with client certificates required ([`ServerTls`]).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{in_netns, poll, ChildGuard, TempDir};

/// Where etcd keeps its data: tmpfs, so that its fsyncs are cheap and its
/// preallocated write-ahead logs never fill the disk.
const DATA_BASE: &str = "/dev/shm";

/// TLS on the members' client URLs (`https://`); peers talk plain HTTP among themselves.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The members' certificate and key (one for all; its names must cover their
    /// addresses).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA whose clients are trusted (`--trusted-ca-file`), and which etcdctl
    /// trusts to check the members' certificate.
    pub ca: PathBuf,
    /// Require a client certificate signed by `ca` (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// The certificate and key etcdctl presents (needed with `client_cert_auth`).
    pub etcdctl_identity: Option<(PathBuf, PathBuf)>,
}

struct Member {
    name: String,
    client: String,
    peer: String,
    process: Option<ChildGuard>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial: String,
    netns: Option<String>,
    tls: Option<ServerTls>,
    dir: TempDir,
}

impl EtcdCluster {
    /// `n` members on 127.0.0.1, on ports the kernel picked.
    pub fn loopback(n: usize) -> EtcdCluster {
        EtcdCluster::start(n, None, "127.0.0.1")
    }

    /// `n` members listening on `ip`, inside the namespace `netns` when given (entered
    /// with `nsenter --net`, so the members see the host's files).
    pub fn start(n: usize, netns: Option<&str>, ip: &str) -> EtcdCluster {
        EtcdCluster::start_with(n, netns, ip, None)
    }

    /// `n` members on 127.0.0.1 serving clients over TLS.
    pub fn loopback_tls(n: usize, tls: ServerTls) -> EtcdCluster {
        EtcdCluster::start_with(n, None, "127.0.0.1", Some(tls))
    }

    /// [`EtcdCluster::start`], with TLS on the client URLs when `tls` is given.
    pub fn start_with(
        n: usize,
        netns: Option<&str>,
        ip: &str,
        tls: Option<ServerTls>,
    ) -> EtcdCluster {
        assert!(
            Command::new("etcd").arg("--version").output().is_ok(),
            "etcd is missing: install Debian's etcd-server (scripts/test.sh does)"
        );
        let base = if std::path::Path::new(DATA_BASE).is_dir() {
            TempDir::new_in(std::path::Path::new(DATA_BASE), "etcd")
        } else {
            TempDir::new("etcd")
        };
        let ports: Vec<(u16, u16)> = match netns {
            // A namespace of the test's own: nothing else listens there.
            Some(_) => (0..n as u16).map(|i| (23790 + i, 23890 + i)).collect(),
            None => (0..n)
                .map(|_| (crate::free_port(), crate::free_port()))
                .collect(),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://{ip}:{c}"),
                peer: format!("http://{ip}:{p}"),
                process: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial,
            netns: netns.map(str::to_string),
            tls,
            dir: base,
        };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_healthy(&(0..n).collect::<Vec<_>>());
        cluster
    }

    /// The members' client URLs, comma-separated (what `*_ETCD_ENDPOINTS` take).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client.clone()
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(&self.members[i].name)
    }

    /// Start member `i` (again, on its old data if it ran before).
    pub fn start_member(&mut self, i: usize) {
        let data = self.data_dir(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.members[i].name)))
            .expect("etcd log file");
        let m = &self.members[i];
        let mut cmd = in_netns(self.netns.as_deref(), "etcd");
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "mergen-test"])
            // Elections in well under a second, as tests need.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca);
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        cmd.stdout(log.try_clone().expect("etcd log")).stderr(log);
        self.members[i].process = Some(ChildGuard::spawn(&mut cmd));
    }

    /// Kill member `i` (SIGKILL, as a crash).
    pub fn stop_member(&mut self, i: usize) {
        drop(self.members[i].process.take());
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].process.is_none() {
                self.start_member(i);
            }
        }
    }

    /// Wait until members `which` answer as healthy (which needs a quorum).
    pub fn wait_healthy(&self, which: &[usize]) {
        let endpoints: Vec<String> = which.iter().map(|&i| self.endpoint(i)).collect();
        let ok = poll(Duration::from_secs(30), || {
            let out = self
                .etcdctl()
                .arg(format!("--endpoints={}", endpoints.join(",")))
                .args(["endpoint", "health"])
                .output()
                .ok()?;
            out.status.success().then_some(())
        });
        assert!(
            ok.is_some(),
            "etcd members {which:?} never became healthy: {}",
            self.logs()
        );
    }

    /// The member that is the leader now, when one answers as such (`etcdctl endpoint
    /// status`: one line per member, `endpoint, id, version, size, is leader, ...`).
    pub fn leader(&self) -> Option<usize> {
        let out = self
            .etcdctl()
            .arg(format!("--endpoints={}", self.endpoints()))
            .args(["endpoint", "status"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.split(", ").nth(4) == Some("true"))?;
        let endpoint = line.split(", ").next()?;
        self.members.iter().position(|m| m.client == endpoint)
    }

    /// `etcdctl` (API v3) in the cluster's namespace, with a short timeout.
    pub fn etcdctl(&self) -> Command {
        let mut cmd = in_netns(self.netns.as_deref(), "etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args(["--dial-timeout=2s", "--command-timeout=3s"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some((cert, key)) = &tls.etcdctl_identity {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        cmd
    }

    /// `etcdctl` against every member, with `args`; its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self
            .etcdctl()
            .arg(format!("--endpoints={}", self.endpoints()))
            .args(args)
            .output()
            .expect("running etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every member's log, for a failing test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!(
                    "--- {}\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // The processes go before their data.
        self.stop_all();
    }
}

/// A loopback etcd over mutual TLS, the CA it trusts, and a client certificate of
/// that CA whose common name is `host-a` (which etcdctl presents too).
#[cfg(feature = "pki")]
pub struct MutualTlsEtcd {
    pub etcd: EtcdCluster,
    pub ca: crate::pki::TestCa,
    pub client: crate::pki::Issued,
    // Dropped last: the members go before their certificates.
    _dir: TempDir,
}

#[cfg(feature = "pki")]
impl MutualTlsEtcd {
    /// `n` members on 127.0.0.1 requiring client certificates.
    pub fn loopback(n: usize) -> MutualTlsEtcd {
        let dir = TempDir::new("etcd-pki");
        let ca = crate::pki::TestCa::new(dir.path(), "etcd");
        let server = ca.server("etcd", &["127.0.0.1".parse().expect("an address")]);
        let client = ca.client("host-a", "host-a");
        let etcd = EtcdCluster::loopback_tls(
            n,
            ServerTls {
                cert: server.cert,
                key: server.key,
                ca: ca.ca_file.clone(),
                client_cert_auth: true,
                etcdctl_identity: Some((client.cert.clone(), client.key.clone())),
            },
        );
        MutualTlsEtcd {
            etcd,
            ca,
            client,
            _dir: dir,
        }
    }

    /// A directory for more of a test's certificates.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }
}
