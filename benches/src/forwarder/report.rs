//! Medians, spreads and ratios of the collected samples, printed as a table, written as
//! JSON and Markdown, and drawn as an SVG chart.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::scenario::{Better, Metric, Scenario};

/// A terminator's role in the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Ranked against the others.
    Main,
    /// Shown for context, compared with the main baselines only.
    Extra,
}

#[derive(Clone, Debug)]
pub struct Column {
    pub id: &'static str,
    pub label: &'static str,
    pub role: Role,
    /// Columns of one family (the forwarder and its variants) are never each other's
    /// "best other".
    pub family: &'static str,
    pub version: String,
    pub tls: String,
}

pub struct Results {
    pub scenarios: Vec<Scenario>,
    pub columns: Vec<Column>,
    pub bulk_mib: u64,
    pub idle: usize,
    samples: HashMap<(Scenario, usize, usize), Vec<f64>>,
}

/// Median, extremes and number of samples of one cell.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Cell {
    /// Half the range, as a percentage of the median.
    pub fn spread_pct(&self) -> f64 {
        if self.median.abs() < f64::EPSILON {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median.abs() * 100.0
        }
    }
}

fn cell(samples: &[f64]) -> Option<Cell> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Cell {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

impl Results {
    pub fn new(scenarios: Vec<Scenario>, columns: Vec<Column>, bulk_mib: u64, idle: usize) -> Self {
        Results {
            scenarios,
            columns,
            bulk_mib,
            idle,
            samples: HashMap::new(),
        }
    }

    pub fn add(&mut self, scenario: Scenario, column: usize, values: &[f64]) {
        for (metric, v) in values.iter().enumerate() {
            if v.is_finite() {
                self.samples
                    .entry((scenario, metric, column))
                    .or_default()
                    .push(*v);
            }
        }
    }

    pub fn cell(&self, s: Scenario, metric: usize, column: usize) -> Option<Cell> {
        self.samples.get(&(s, metric, column)).and_then(|v| cell(v))
    }

    /// The best median among the main columns other than `column` (and outside its
    /// family), with that column's index.
    pub fn best_other(&self, s: Scenario, metric: usize, column: usize) -> Option<(f64, usize)> {
        let better = s.metrics()[metric].better;
        let me = &self.columns[column];
        self.columns
            .iter()
            .enumerate()
            .filter(|(i, c)| *i != column && c.role == Role::Main && c.family != me.family)
            .filter_map(|(i, _)| Some((self.cell(s, metric, i)?.median, i)))
            .reduce(|a, b| match better {
                Better::Higher if b.0 > a.0 => b,
                Better::Lower if b.0 < a.0 => b,
                _ => a,
            })
    }

    /// This column's median divided by the best other's.
    pub fn ratio(&self, s: Scenario, metric: usize, column: usize) -> Option<(f64, usize)> {
        if s.metrics()[metric].better == Better::Info {
            return None;
        }
        let mine = self.cell(s, metric, column)?.median;
        let (best, against) = self.best_other(s, metric, column)?;
        // A best of zero or less (memory that did not grow) has no meaningful ratio.
        (best > 0.0).then(|| (mine / best, against))
    }

    /// "1.55× HAProxy", or "HAProxy ≈ 0" when the best other figure is not positive.
    fn ratio_text(&self, s: Scenario, metric: usize, column: usize) -> String {
        if s.metrics()[metric].better == Better::Info {
            return String::new();
        }
        match (
            self.ratio(s, metric, column),
            self.best_other(s, metric, column),
        ) {
            (Some((r, against)), _) => format!("{r:.2}× {}", self.columns[against].label),
            (None, Some((_, against))) => format!("{} ≈ 0", self.columns[against].label),
            (None, None) => String::new(),
        }
    }

    fn shown_columns(&self, s: Scenario) -> Vec<usize> {
        (0..self.columns.len())
            .filter(|&c| (0..s.metrics().len()).any(|m| self.cell(s, m, c).is_some()))
            .collect()
    }

    /// The first main column (the forwarder), whose ratio gets its own column.
    fn subject(&self) -> Option<usize> {
        self.columns.iter().position(|c| c.role == Role::Main)
    }

    /// One scenario as a grid: the header (metric, a column per terminator, the
    /// forwarder's ratio) and a row of cells per metric; None when nothing ran.
    fn grid(&self, s: Scenario) -> Option<(Vec<String>, Vec<Vec<String>>)> {
        let cols = self.shown_columns(s);
        if cols.is_empty() {
            return None;
        }
        let subject = self.subject();
        let mut head = vec![String::new()];
        head.extend(cols.iter().map(|&c| self.columns[c].label.to_string()));
        head.extend(subject.map(|f| format!("{} ÷ best other", self.columns[f].label)));
        let rows = s
            .metrics()
            .iter()
            .enumerate()
            .map(|(mi, metric)| {
                let mut row = vec![metric.name.to_string()];
                row.extend(cols.iter().map(|&c| {
                    self.cell(s, mi, c)
                        .map_or("—".into(), |x| fmt_cell(x, metric))
                }));
                row.extend(subject.map(|f| self.ratio_text(s, mi, f)));
                row
            })
            .collect();
        Some((head, rows))
    }

    pub fn text_table(&self) -> String {
        let mut out = String::new();
        for &s in &self.scenarios {
            let Some((head, rows)) = self.grid(s) else {
                continue;
            };
            let _ = writeln!(out, "\n{}", s.title(self.bulk_mib, self.idle));
            for row in std::iter::once(&head).chain(&rows) {
                let last = row.len() - 1;
                for (i, cell) in row.iter().enumerate() {
                    let _ = match i {
                        0 => write!(out, "{cell:<20}"),
                        i if i == last => write!(out, " {cell:>22}"),
                        _ => write!(out, " {cell:>18}"),
                    };
                }
                out.push('\n');
            }
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        for &s in &self.scenarios {
            let Some((head, rows)) = self.grid(s) else {
                continue;
            };
            let _ = writeln!(out, "\n**{}**\n", s.title(self.bulk_mib, self.idle));
            let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
            out.push_str(&line(&head));
            let mut rule = vec!["---".to_string()];
            rule.extend((1..head.len()).map(|_| "---:".to_string()));
            out.push_str(&line(&rule));
            for row in &rows {
                out.push_str(&line(row));
            }
        }
        out
    }

    pub fn json(&self, about: Value) -> Value {
        let columns: Vec<Value> = self
            .columns
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "label": c.label,
                    "role": match c.role { Role::Main => "main", Role::Extra => "extra" },
                    "version": c.version,
                    "tls": c.tls,
                })
            })
            .collect();
        let mut rows = Vec::new();
        for &s in &self.scenarios {
            for (mi, metric) in s.metrics().iter().enumerate() {
                let mut values = serde_json::Map::new();
                for (ci, c) in self.columns.iter().enumerate() {
                    let Some(x) = self.cell(s, mi, ci) else {
                        continue;
                    };
                    let samples = self.samples.get(&(s, mi, ci)).cloned().unwrap_or_default();
                    let mut v = json!({
                        "median": x.median, "min": x.min, "max": x.max,
                        "spread_pct": x.spread_pct(), "samples": samples,
                    });
                    if let Some((r, against)) = self.ratio(s, mi, ci) {
                        v["ratio_to_best_other"] = json!(r);
                        v["best_other"] = json!(self.columns[against].id);
                    }
                    values.insert(c.id.to_string(), v);
                }
                if values.is_empty() {
                    continue;
                }
                rows.push(json!({
                    "scenario": s.key(),
                    "title": s.title(self.bulk_mib, self.idle),
                    "metric": metric.name,
                    "better": match metric.better {
                        Better::Higher => "higher", Better::Lower => "lower", Better::Info => "info",
                    },
                    "values": values,
                }));
            }
        }
        json!({ "about": about, "terminators": columns, "rows": rows })
    }

    /// Grouped horizontal bars: for each headline figure, each main terminator relative
    /// to the best of the other main terminators that are not the forwarder (1 = level
    /// with the best baseline, right of it = better; costs are inverted so that right
    /// is always better), on a log scale.
    pub fn svg(&self, subtitle: &str) -> String {
        let headline: Vec<(Scenario, usize, String)> = self
            .scenarios
            .iter()
            .flat_map(|&s| {
                s.metrics()
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.better != Better::Info && !m.name.starts_with("p99.9"))
                    .filter(|(_, m)| !(m.name.starts_with("RSS")))
                    .map(move |(i, m)| (s, i, format!("{} · {}", short_title(s), m.name)))
            })
            .filter(|(s, m, _)| {
                self.columns
                    .iter()
                    .enumerate()
                    .any(|(c, _)| self.cell(*s, *m, c).is_some())
            })
            .collect();
        let mains: Vec<usize> = (0..self.columns.len())
            .filter(|&c| self.columns[c].role == Role::Main)
            .collect();
        let baselines: Vec<usize> = mains
            .iter()
            .copied()
            .filter(|&c| Some(c) != self.subject())
            .collect();
        let colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"];
        let (left, bar, gap, width, plot) = (250.0, 9.0, 10.0, 900.0, 560.0);
        let group = bar * mains.len() as f64 + gap;
        let top = 70.0;
        let height = top + group * headline.len() as f64 + 60.0;
        // log2 scale from 1/8 to 8.
        let (lo, hi) = (-3.0f64, 3.0f64);
        let x = |ratio: f64| {
            let l = ratio.max(1e-9).log2().clamp(lo, hi);
            left + (l - lo) / (hi - lo) * plot
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="10" y="20" font-size="14" font-weight="bold">TLS terminators vs the best of nginx stream, HAProxy, hitch (right = better, costs inverted, log scale)</text>"#
        );
        let _ = writeln!(s, r#"<text x="10" y="38">{}</text>"#, xml(subtitle));
        // Legend.
        let mut lx = 10.0;
        for (k, &c) in mains.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="48" width="10" height="10" fill="{}"/><text x="{}" y="57">{}</text>"#,
                colors[k % colors.len()],
                lx + 14.0,
                xml(self.columns[c].label)
            );
            lx += 24.0 + 7.0 * self.columns[c].label.len() as f64;
        }
        // Grid.
        for t in [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0] {
            let gx = x(t);
            let (stroke, w) = if t == 1.0 {
                ("#000", 1.5)
            } else {
                ("#ccc", 1.0)
            };
            let _ = writeln!(
                s,
                r#"<line x1="{gx:.1}" y1="{top}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="{w}"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}×</text>"#,
                height - 45.0,
                height - 32.0,
                if t < 1.0 {
                    format!("{t}")
                } else {
                    format!("{t:.0}")
                }
            );
        }
        for (g, (sc, metric, label)) in headline.iter().enumerate() {
            let y0 = top + g as f64 * group;
            let better = sc.metrics()[*metric].better;
            let best = baselines
                .iter()
                .filter_map(|&c| self.cell(*sc, *metric, c).map(|x| x.median))
                .reduce(|a, b| match better {
                    Better::Lower => a.min(b),
                    _ => a.max(b),
                });
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y0 + group / 2.0,
                xml(label)
            );
            let Some(best) = best else { continue };
            for (k, &c) in mains.iter().enumerate() {
                let Some(v) = self.cell(*sc, *metric, c).map(|x| x.median) else {
                    continue;
                };
                let ratio = match better {
                    Better::Lower if v > 0.0 => best / v,
                    Better::Lower => hi.exp2(),
                    _ if best > 0.0 => v / best,
                    _ => 1.0,
                };
                let (x1, x0) = (x(ratio), x(1.0));
                let (bx, bw) = if x1 >= x0 {
                    (x0, x1 - x0)
                } else {
                    (x1, x0 - x1)
                };
                let by = y0 + k as f64 * bar;
                let _ = writeln!(
                    s,
                    r#"<rect x="{bx:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {ratio:.2}×</title></rect>"#,
                    bw.max(2.0),
                    bar - 1.0,
                    colors[k % colors.len()],
                    xml(self.columns[c].label)
                );
                if c == mains[0] {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" font-size="9">{ratio:.2}×</text>"#,
                        bx + bw + 3.0,
                        by + bar - 2.0
                    );
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn short_title(s: Scenario) -> &'static str {
    match s {
        Scenario::KeepAlive => "keep-alive",
        Scenario::NewConn16 => "new conn ×16",
        Scenario::NewConn1 => "new conn ×1",
        Scenario::Bulk1 => "bulk 1 stream",
        Scenario::Bulk16 => "bulk 16 streams",
        Scenario::Rsa => "RSA-2048 new conn",
        Scenario::UnknownName => "unknown SNI",
        Scenario::IdleHello => "idle pre-handshake",
        Scenario::IdleTls => "idle TLS",
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_cell(c: Cell, metric: &Metric) -> String {
    let v = c.median;
    let num = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if metric.better == Better::Info || c.n < 2 {
        num
    } else {
        format!("{num} ±{:.0}%", c.spread_pct())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(id: &'static str, role: Role, family: &'static str) -> Column {
        Column {
            id,
            label: id,
            role,
            family,
            version: String::new(),
            tls: String::new(),
        }
    }

    #[test]
    fn medians_spreads_and_best_other() {
        let mut r = Results::new(
            vec![Scenario::KeepAlive],
            vec![
                col("fwd", Role::Main, "fwd"),
                col("a", Role::Main, "a"),
                col("b", Role::Main, "b"),
                col("fwd-debug", Role::Extra, "fwd"),
            ],
            64,
            10,
        );
        // req/s (higher is better) then p50 (lower is better).
        for (c, vals) in [
            (0, [[300.0, 10.0], [330.0, 12.0], [310.0, 11.0]]),
            (1, [[200.0, 20.0], [210.0, 20.0], [190.0, 20.0]]),
            (2, [[150.0, 5.0], [150.0, 6.0], [150.0, 7.0]]),
            (3, [[250.0, 9.0], [250.0, 9.0], [250.0, 9.0]]),
        ] {
            for v in vals {
                r.add(Scenario::KeepAlive, c, &v);
            }
        }
        let fwd = r.cell(Scenario::KeepAlive, 0, 0).unwrap();
        assert_eq!(
            (fwd.median, fwd.min, fwd.max, fwd.n),
            (310.0, 300.0, 330.0, 3)
        );
        assert!((fwd.spread_pct() - 15.0 / 310.0 * 100.0).abs() < 1e-9);
        // The forwarder against the best of a and b: a on throughput, b on latency.
        let (ratio, against) = r.ratio(Scenario::KeepAlive, 0, 0).unwrap();
        assert_eq!(against, 1);
        assert!((ratio - 310.0 / 200.0).abs() < 1e-9);
        let (ratio, against) = r.ratio(Scenario::KeepAlive, 1, 0).unwrap();
        assert_eq!(against, 2);
        assert!((ratio - 11.0 / 6.0).abs() < 1e-9);
        // An extra of the forwarder's family is compared with the baselines only.
        assert_eq!(r.ratio(Scenario::KeepAlive, 0, 3).unwrap().1, 1);
        // A baseline's best other includes the forwarder.
        assert_eq!(r.ratio(Scenario::KeepAlive, 0, 1).unwrap().1, 0);
        // Info rows are never ranked.
        let mut info = [f64::NAN; 6];
        info[5] = 1.0;
        r.add(Scenario::KeepAlive, 0, &info);
        assert!(r.ratio(Scenario::KeepAlive, 5, 0).is_none());
        let svg = r.svg("test");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let table = r.text_table();
        assert!(table.contains("1.55× a"), "{table}");
        let md = r.markdown();
        assert!(md.contains("| req/s | 310 ±5% |"), "{md}");
        assert!(md.contains("| 1.55× a |"), "{md}");
    }
}
