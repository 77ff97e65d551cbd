//! Tests that need root skip loudly when they do not have it.

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True when `test` must be skipped; then prints `SKIP: <test> needs root` to stderr.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIP: {test} needs root");
    true
}

/// Returns from the calling test (after the loud SKIP line) unless it runs as root.
/// Without an argument the line names the enclosing function.
#[macro_export]
macro_rules! require_root {
    () => {
        $crate::require_root!({
            fn here() {}
            fn name_of<T>(_: T) -> &'static str {
                ::std::any::type_name::<T>()
            }
            let path = name_of(here);
            let path = path.strip_suffix("::here").unwrap_or(path);
            path.rsplit("::").next().unwrap_or(path)
        })
    };
    ($test:expr) => {
        if $crate::skip_unless_root($test) {
            return;
        }
    };
}
