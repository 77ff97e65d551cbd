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
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--fail", "--max-time", "2", url])
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
