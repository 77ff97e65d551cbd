//! Names derived from a VM id. They must match the original byte for byte: operators
//! find taps and namespaces by these names.

/// The first 8 characters of the id: the short alias used in names and SNI labels.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// `tap-<id8>`: the guest's tap device inside the VM namespace.
pub fn tap_name(id: &str) -> String {
    format!("tap-{}", short_id(id))
}

/// `mergen-<id8>`: the VM's named network namespace.
pub fn netns_name(id: &str) -> String {
    format!("mergen-{}", short_id(id))
}

/// `02:FC:<AA>:<BB>:<CC>:01` from the first six hex digits of the id, uppercased.
pub fn guest_mac(id: &str) -> String {
    let hex: String = id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(6)
        .collect::<String>()
        .to_ascii_uppercase();
    let hex = format!("{hex:0<6}");
    format!("02:FC:{}:{}:{}:01", &hex[0..2], &hex[2..4], &hex[4..6])
}

/// Whether `s` is a lowercase hyphenated UUID, the only id form accepted on disk and
/// on the API (so an id can never carry `/` or `..` into a path).
pub fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(&c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    #[test]
    fn derived_names_match_the_original() {
        assert_eq!(short_id(ID), "084604f6");
        assert_eq!(tap_name(ID), "tap-084604f6");
        assert_eq!(netns_name(ID), "mergen-084604f6");
        assert_eq!(guest_mac(ID), "02:FC:08:46:04:01");
    }

    #[test]
    fn ids_must_be_lowercase_uuids() {
        assert!(is_valid_id(ID));
        assert!(!is_valid_id(&ID.to_uppercase()));
        assert!(!is_valid_id("../../etc/passwd"));
        assert!(!is_valid_id("084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f"));
        assert!(!is_valid_id("084604f6x1b2c-4d5e-8f90-a1b2c3d4e5f6"));
    }
}
