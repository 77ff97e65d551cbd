//! The values stored under [`crate::keys`]: JSON, camelCase like meta.json.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A host of the cluster: where other hosts' forwarders reach its VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRecord {
    pub name: String,
    /// The address other hosts' forwarders dial (an IP address), on the port of the
    /// listener the client came in on.
    pub addr: String,
}

/// A VM's route, as its owning host published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub id: String,
    /// The owning host's name.
    pub host: String,
    /// The owning host's address (as in its [`HostRecord`]).
    pub addr: String,
    /// The aliases this VM answers to cluster-wide: those whose claim its host holds.
    pub aliases: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl VmRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a VmRecord always serializes")
    }
}

impl HostRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a HostRecord always serializes")
    }
}
