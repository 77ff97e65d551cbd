//! The pull's progress line on stderr: layers and bytes, redrawn in place at most ten
//! times a second on a terminal, one line per finished layer otherwise (logs).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    enabled: bool,
    tty: bool,
    what: String,
    layers: usize,
    layers_done: usize,
    total: u64,
    bytes: u64,
    last: Option<Instant>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            what: String::new(),
            layers: 0,
            layers_done: 0,
            total: 0,
            bytes: 0,
            last: None,
        }
    }

    pub fn start(&mut self, what: &str, layers: usize, total: u64) {
        self.what = what.to_string();
        (self.layers, self.total) = (layers, total);
        self.draw(true);
    }

    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
        self.draw(false);
    }

    pub fn layer_done(&mut self) {
        self.layers_done += 1;
        if self.tty {
            self.draw(true);
        } else {
            self.line();
        }
    }

    pub fn finish(&mut self) {
        if self.enabled && self.tty {
            self.draw(true);
            eprintln!();
        }
    }

    fn text(&self) -> String {
        format!(
            "pulling {}: layers {}/{}, {:.1}/{:.1} MiB",
            self.what,
            self.layers_done,
            self.layers,
            mib(self.bytes),
            mib(self.total)
        )
    }

    fn line(&self) {
        if self.enabled {
            eprintln!("{}", self.text());
        }
    }

    fn draw(&mut self, force: bool) {
        if !self.enabled || !self.tty {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", self.text());
        let _ = err.flush();
    }
}
