//! Reading a Prometheus text exposition, as the daemons' `/metrics` render it.

/// The value of one series (`name{labels}` exactly as rendered); `None` when absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    #[test]
    fn finds_the_exact_series_only() {
        let text = "# TYPE a counter\na 1\na{x=\"1\"} 2.5\nab 3\n";
        assert_eq!(metric_value(text, "a"), Some(1.0));
        assert_eq!(metric_value(text, "a{x=\"1\"}"), Some(2.5));
        assert_eq!(metric_value(text, "ab"), Some(3.0));
        assert_eq!(metric_value(text, "a{x=\"2\"}"), None);
    }
}
