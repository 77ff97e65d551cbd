//! The names a VM answers to, in SNI labels and across a cluster: one definition, read
//! by the forwarder (routing) and by mergend (cluster-wide alias claims).

use std::collections::BTreeMap;

/// The tag and metadata keys whose string values are aliases, as in the original.
pub const ALIAS_KEYS: [&str; 4] = ["host", "hostname", "app", "name"];

/// Every alias of a VM, lowercase, sorted, without duplicates: its full id, the first 8
/// characters of its id, and the `host`, `hostname`, `app` and `name` values of its tags
/// and metadata. A name with a dot can never be a label and an empty one never matches,
/// so neither is an alias.
pub fn aliases(
    id: &str,
    tags: &BTreeMap<String, String>,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Vec<String> {
    let mut out = vec![
        id.to_ascii_lowercase(),
        crate::names::short_id(id).to_ascii_lowercase(),
    ];
    for key in ALIAS_KEYS {
        if let Some(v) = tags.get(key) {
            out.push(v.to_ascii_lowercase());
        }
    }
    for key in ALIAS_KEYS {
        if let Some(serde_json::Value::String(v)) = metadata.get(key) {
            out.push(v.to_ascii_lowercase());
        }
    }
    out.retain(|a| !a.is_empty() && !a.contains('.'));
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_tags_and_string_metadata() {
        let id = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";
        let tags: BTreeMap<String, String> = [("app", "App1"), ("host", "a.b"), ("x", "no")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let metadata = json!({"name": "web", "hostname": 7, "app": ""});
        let got = aliases(id, &tags, metadata.as_object().unwrap());
        assert_eq!(got, vec!["084604f6", id, "app1", "web"]);
    }
}
