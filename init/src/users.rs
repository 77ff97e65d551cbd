//! Docker's USER semantics, resolved from the image's own `/etc/passwd` and
//! `/etc/group` (never the host's NSS: the guest has no other source).

/// The identity the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: every group of `/etc/group` that lists the user, plus
    /// the primary group.
    pub groups: Vec<u32>,
    pub home: String,
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = Passwd<'_>> {
    passwd.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && !line.starts_with('#')).then_some(())?;
        Some(Passwd {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// `(name, gid, members)` of each well-formed `/etc/group` line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && !line.starts_with('#')).then_some(())?;
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolve `spec` (`user`, `uid`, `user:group`, `uid:gid`, or a mix) against the file
/// contents. A numeric uid without a passwd entry runs with gid 0 and HOME `/`, as
/// Docker does; an unknown name is an error.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() {
        "root"
    } else {
        user_part
    };
    let entry = passwd_entries(passwd).find(|p| match user_part.parse::<u32>() {
        Ok(uid) => p.uid == uid,
        Err(_) => p.name == user_part,
    });
    let (uid, mut gid, home, name) = match (&entry, user_part.parse::<u32>()) {
        (Some(p), _) => (p.uid, p.gid, p.home.to_string(), Some(p.name)),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        (None, Err(_)) => {
            return Err(format!(
                "user {user_part:?} is not in the image's /etc/passwd"
            ))
        }
    };
    let mut groups = Vec::new();
    match group_part.filter(|g| !g.is_empty()) {
        Some(g) => {
            // An explicit group replaces the primary one and the supplementary list.
            gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|(n, _, _)| *n == g)
                    .map(|(_, gid, _)| gid)
                    .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
            };
        }
        None => {
            if let Some(name) = name {
                groups.extend(
                    group_entries(group)
                        .filter(|(_, _, members)| members.contains(&name))
                        .map(|(_, gid, _)| gid),
                );
            }
        }
    }
    groups.push(gid);
    groups.sort_unstable();
    groups.dedup();
    Ok(Identity {
        uid,
        gid,
        groups,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nnginx:x:101:101:nginx:/var/lib/nginx:/sbin/nologin\napp:x:1000:1000::/home/app:/bin/sh\nbroken\n";
    const GROUP: &str =
        "root:x:0:\nnginx:x:101:\napp:x:1000:\nwww:x:33:app,nginx\naudio:x:29:app\n";

    #[test]
    fn names_and_numbers() {
        let root = resolve("root", PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, [29, 33, 1000]);
        assert_eq!(
            resolve("101", PASSWD, GROUP).unwrap().home,
            "/var/lib/nginx"
        );
        let anon = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!(
            (
                anon.uid,
                anon.gid,
                anon.groups.as_slice(),
                anon.home.as_str()
            ),
            (4242, 0, &[0u32][..], "/")
        );
    }

    #[test]
    fn explicit_group() {
        let a = resolve("app:www", PASSWD, GROUP).unwrap();
        assert_eq!(
            (a.uid, a.gid, a.groups.as_slice()),
            (1000, 33, &[33u32][..])
        );
        let b = resolve("5:7", "", "").unwrap();
        assert_eq!((b.uid, b.gid), (5, 7));
        assert!(resolve("app:nope", PASSWD, GROUP)
            .unwrap_err()
            .contains("nope"));
        assert!(resolve("ghost", PASSWD, GROUP)
            .unwrap_err()
            .contains("ghost"));
    }
}
