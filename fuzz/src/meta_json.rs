//! Reading `meta.json`: mergend's full model (`mergen_model::Meta`) and the
//! forwarder's lenient routing view (`mergen_model::RouteMeta`).
//!
//! Beyond "no panic", each input checks that:
//! * the forwarder reads whatever mergend reads, with the same routing fields;
//! * what mergend reads it writes back (`atomic::write_json`'s bytes) and reads again
//!   unchanged;
//! * a meta.json is an object, and a field the forwarder does not know never changes
//!   what it reads.

use mergen_model::{Meta, RouteMeta};

/// A field only a newer mergend would write.
const NEWER_FIELD: &str = "zzFieldOfANewerMergend";

pub fn check(data: &[u8]) {
    let route = RouteMeta::from_slice(data);
    if let Ok(meta) = Meta::from_slice(data) {
        let route = match &route {
            Ok(route) => route,
            Err(e) => panic!("mergend reads it, the forwarder does not: {e}"),
        };
        assert_eq!(route.id, meta.id);
        assert_eq!(route.created_at, meta.created_at);
        assert_eq!(route.guest_ip, meta.guest_ip);
        assert_eq!(route.netns, meta.netns);
        assert_eq!(route.tags, meta.tags);
        assert_eq!(route.metadata, meta.metadata);
        // The bytes `mergen_model::atomic::write_json` writes.
        let mut written = serde_json::to_vec_pretty(&meta).expect("a Meta read serialises");
        written.push(b'\n');
        match Meta::from_slice(&written) {
            Ok(again) => assert_eq!(again, meta, "meta.json changed on a write and read"),
            Err(e) => panic!("mergend cannot read the meta.json it wrote: {e}"),
        }
    }
    if let Ok(route) = route {
        // Like Go's encoding/json, the forwarder does not look inside what it ignores
        // (invalid UTF-8 there included), so what it reads need not be valid JSON.
        let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let object = doc
            .as_object_mut()
            .unwrap_or_else(|| panic!("the forwarder read a meta.json that is not an object"));
        object.insert(NEWER_FIELD.into(), serde_json::json!({"a": [1, null, "b"]}));
        let bytes = serde_json::to_vec(&doc).expect("a Value serialises");
        match RouteMeta::from_slice(&bytes) {
            Ok(again) => assert_eq!(again, route, "an unknown field changed the route"),
            Err(e) => panic!("an unknown field stopped the forwarder's reader: {e}"),
        }
    }
}
