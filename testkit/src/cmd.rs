use std::process::Command;

/// The standard output of `argv` (whatever its exit status): for reading host state
/// with the system's own tools (ip, nft) rather than with the code under test.
pub fn run_out(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET `url` with curl, inside the namespace `netns` when given: the body of a 2xx
/// answer, or curl's error.
pub fn curl_get(netns: Option<&str>, url: &str) -> Result<String, String> {
    let out = in_netns(netns, "curl")
        .args(["-sS", "--fail", "--max-time", "2", url])
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `program` run inside the named namespace `netns` when given (`nsenter --net`, which
/// execs it: the pid is the program's), else here. Unlike `ip netns exec` it keeps the
/// caller's mount namespace, so what the program mounts under /run/netns (a mergend's
/// VM namespaces) is seen by everyone.
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(program);
            c
        }
        None => Command::new(program),
    }
}
