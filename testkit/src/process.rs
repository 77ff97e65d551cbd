/// Whether `pid` is a running process, read from /proc directly (not through the code
/// under test): a zombie or a reaped process has an empty or no command line (and so,
/// for a moment, has a child in the middle of its exec).
pub fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// The first child of `pid` (`/proc/<pid>/task/<pid>/children`): how a test follows a
/// chain of processes (a launcher, its init, the init's command) by pid.
pub fn first_child(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The lines of this process's mount table (`/proc/self/mountinfo`) that name `path`:
/// empty when nothing is mounted on or from it where the test can see.
pub fn mounts_naming(path: &std::path::Path) -> Vec<String> {
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(path.as_ref()))
        .map(str::to_string)
        .collect()
}
