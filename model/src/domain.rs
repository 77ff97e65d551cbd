//! Domain names as both daemons compare them.

/// A domain part as configured (`FWD_DOMAIN_SUFFIX=.Example.COM.`, a `--suffix` flag):
/// trimmed, without leading or trailing dots, lowercase. Names are ASCII on the wire
/// (SNI carries A-labels), so lowercasing ASCII is the whole case rule.
pub fn normalize(s: &str) -> String {
    s.trim().trim_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_dots_and_space_and_lowercases() {
        let cases = [
            (".Example.COM.", "example.com"),
            ("  vm ", "vm"),
            ("localhost", "localhost"),
            ("..", ""),
            ("", ""),
            (" . ", ""),
            ("A.b..C", "a.b..c"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "{input:?}");
        }
    }
}
