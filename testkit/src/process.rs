/// Whether `pid` is a running process, read from /proc directly (not through the code
/// under test): a zombie or a reaped process has an empty or no command line (and so,
/// for a moment, has a child in the middle of its exec).
pub fn running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}
