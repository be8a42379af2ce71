//! What `daffi-bench` reports: figures over repetitions, their floor, ratios, targets;
//! printed as a table or as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency percentiles of one repetition, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Mean.
    pub mean: f64,
    /// Samples measured.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted in place). `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            // Nearest rank: the smallest sample with at least q of them at or below it.
            // (The small epsilon keeps 0.99 * 1000 = 990.0000000000001 at rank 990.)
            let rank = ((q * samples.len() as f64 - 1e-9).ceil() as usize).clamp(1, samples.len());
            micros(samples[rank - 1])
        };
        let total: Duration = samples.iter().sum();
        Some(Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            mean: micros(total / samples.len() as u32),
            samples: samples.len(),
        })
    }
}

/// A duration in microseconds.
pub fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Min, median and max of one figure over the repetitions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Smallest value.
    pub min: f64,
    /// Median value (the mean of the two middle ones for an even count).
    pub median: f64,
    /// Largest value.
    pub max: f64,
    /// How many repetitions.
    pub reps: usize,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
            reps: n,
        })
    }

    /// A single measurement.
    pub fn one(value: f64) -> Spread {
        Spread {
            min: value,
            median: value,
            max: value,
            reps: 1,
        }
    }
}

/// The unit of a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// Microseconds (latency).
    #[serde(rename = "us")]
    Micros,
    /// Calls per second.
    #[serde(rename = "calls/s")]
    CallsPerSec,
    /// MiB per second.
    #[serde(rename = "MiB/s")]
    MibPerSec,
    /// MiB (memory).
    #[serde(rename = "MiB")]
    Mib,
    /// Seconds.
    #[serde(rename = "s")]
    Secs,
    /// Messages per second.
    #[serde(rename = "msgs/s")]
    MsgsPerSec,
}

impl Unit {
    fn label(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::CallsPerSec => "calls/s",
            Unit::MibPerSec => "MiB/s",
            Unit::Mib => "MiB",
            Unit::Secs => "s",
            Unit::MsgsPerSec => "msgs/s",
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Unit::Micros | Unit::Mib if v < 100.0 => format!("{v:.1}"),
            Unit::Secs => format!("{v:.2}"),
            _ => format!("{v:.0}"),
        }
    }
}

/// What a figure must satisfy.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// daffi / reference must be at most this.
    RatioAtMost {
        /// The bound.
        bound: f64,
    },
    /// daffi / reference must be at least this.
    RatioAtLeast {
        /// The bound.
        bound: f64,
    },
    /// The figure itself must be at most this (in the row's unit).
    AtMost {
        /// The bound.
        bound: f64,
    },
    /// The figure itself must be below this (in the row's unit).
    Below {
        /// The bound.
        bound: f64,
    },
}

impl Target {
    fn describe(&self, unit: Unit) -> String {
        match self {
            Target::RatioAtMost { bound } => format!("<= {bound}x"),
            Target::RatioAtLeast { bound } => format!(">= {bound}x"),
            Target::AtMost { bound } => format!("<= {} {}", unit.format(*bound), unit.label()),
            Target::Below { bound } => format!("< {} {}", unit.format(*bound), unit.label()),
        }
    }

    fn met(&self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match *self {
            Target::RatioAtMost { bound } => ratio.map(|r| r <= bound),
            Target::RatioAtLeast { bound } => ratio.map(|r| r >= bound),
            Target::AtMost { bound } => Some(value <= bound),
            Target::Below { bound } => Some(value < bound),
        }
    }
}

/// What a daffi figure is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// What it is: "floor direct", "floor batched", "A p50, same run", ...
    pub name: String,
    /// Its value over the repetitions.
    pub value: Spread,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario letter: A to E, or F for the floor's own figures.
    pub scenario: char,
    /// What is measured, e.g. "unix p50".
    pub figure: String,
    /// Unit of `value` and of the reference.
    pub unit: Unit,
    /// The daffi figure (or the floor's, in floor rows).
    pub value: Spread,
    /// What it is compared with, if anything.
    pub reference: Option<Reference>,
    /// value.median / reference.median.
    pub ratio: Option<f64>,
    /// The target, if there is one.
    pub target: Option<Target>,
    /// Whether the target is met (on medians).
    pub met: Option<bool>,
}

impl Row {
    /// A figure with no reference and no target.
    pub fn info(scenario: char, figure: impl Into<String>, unit: Unit, value: Spread) -> Row {
        Row {
            scenario,
            figure: figure.into(),
            unit,
            value,
            reference: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    /// Adds the reference it is compared with (and the ratio of the medians).
    pub fn against(mut self, name: impl Into<String>, reference: Spread) -> Row {
        self.ratio = (reference.median > 0.0).then(|| self.value.median / reference.median);
        self.reference = Some(Reference {
            name: name.into(),
            value: reference,
        });
        self.update_met();
        self
    }

    /// Adds a target.
    pub fn target(mut self, target: Target) -> Row {
        self.target = Some(target);
        self.update_met();
        self
    }

    fn update_met(&mut self) {
        self.met = self
            .target
            .and_then(|t| t.met(self.value.median, self.ratio));
    }
}

/// Everything one `daffi-bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// daffi's version.
    pub version: &'static str,
    /// `--quick` was given.
    pub quick: bool,
    /// Repetitions of each scenario.
    pub reps: usize,
    /// Cores of this machine.
    pub cores: usize,
    /// 1-minute load average when the run started and when it ended.
    pub load_average: [Option<f64>; 2],
    /// Wall time of the whole run, seconds.
    pub elapsed_s: f64,
    /// The figures.
    pub rows: Vec<Row>,
    /// Notes on the run (what was skipped, lost calls, ...).
    pub notes: Vec<String>,
}

impl Report {
    /// The report as an aligned text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "daffi-bench {}{}: {} repetitions per figure; median [min..max]; {} cores; load {} -> {}; {:.0} s",
            self.version,
            if self.quick { " --quick" } else { "" },
            self.reps,
            self.cores,
            fmt_load(self.load_average[0]),
            fmt_load(self.load_average[1]),
            self.elapsed_s,
        );
        let header = [
            "",
            "figure",
            "unit",
            "daffi",
            "compared with",
            "reference",
            "ratio",
            "target",
            "met",
        ];
        let mut lines: Vec<[String; 9]> = vec![header.map(String::from)];
        for row in &self.rows {
            let (ref_name, ref_value) = match &row.reference {
                Some(r) => (r.name.clone(), fmt_spread(row.unit, &r.value)),
                None => (String::new(), String::new()),
            };
            lines.push([
                row.scenario.to_string(),
                row.figure.clone(),
                row.unit.label().to_string(),
                fmt_spread(row.unit, &row.value),
                ref_name,
                ref_value,
                row.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
                row.target.map(|t| t.describe(row.unit)).unwrap_or_default(),
                match row.met {
                    Some(true) => "met".into(),
                    Some(false) => "NOT MET".into(),
                    None => String::new(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..9)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut last_scenario = String::new();
        for (n, line) in lines.iter().enumerate() {
            if n > 1 && line[0] != last_scenario {
                out.push('\n');
            }
            last_scenario = line[0].clone();
            let mut text = String::new();
            for (i, cell) in line.iter().enumerate() {
                let pad = widths[i] - cell.chars().count();
                // Numbers right-aligned, words left-aligned.
                if matches!(i, 3 | 5 | 6) {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad));
                }
                text.push_str("  ");
            }
            let _ = writeln!(out, "{}", text.trim_end());
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "note: {note}");
            }
        }
        let targets = self.rows.iter().filter(|r| r.met.is_some()).count();
        let met = self.rows.iter().filter(|r| r.met == Some(true)).count();
        let _ = writeln!(out, "\ntargets met: {met} of {targets}");
        out
    }
}

fn fmt_spread(unit: Unit, s: &Spread) -> String {
    if s.reps <= 1 {
        return unit.format(s.median);
    }
    format!(
        "{} [{}..{}]",
        unit.format(s.median),
        unit.format(s.min),
        unit.format(s.max)
    )
}

fn fmt_load(l: Option<f64>) -> String {
    l.map(|l| format!("{l:.1}")).unwrap_or_else(|| "?".into())
}

/// The 1-minute load average, where the system tells it.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let p = Percentiles::of(&mut samples).expect("samples");
        assert_eq!((p.p50, p.p99, p.p999), (500.0, 990.0, 999.0));
    }

    #[test]
    fn spread_and_targets() {
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]).expect("values");
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
        let row = Row::info('A', "p50", Unit::Micros, Spread::one(120.0))
            .against("floor", Spread::one(100.0))
            .target(Target::RatioAtMost { bound: 1.25 });
        assert_eq!(row.met, Some(true));
        let row = Row::info('B', "rate", Unit::CallsPerSec, Spread::one(20.0))
            .against("floor", Spread::one(100.0))
            .target(Target::RatioAtLeast { bound: 0.5 });
        assert_eq!(row.met, Some(false));
    }
}
