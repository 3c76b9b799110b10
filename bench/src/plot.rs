//! PNG plots of the traffic figures against the number of Services, drawn
//! by gnuplot (Debian's gnuplot-nox, which `cargo xtask bench` installs).

use std::{fmt::Write, path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::traffic::{ClientNumbers, TrafficRow, MODES};

/// One plot: a file name, a title, an axis label and what to draw.
struct Figure {
    file: &'static str,
    title: &'static str,
    ylabel: &'static str,
    pick: fn(&ClientNumbers) -> f64,
}

const FIGURES: &[Figure] = &[
    Figure {
        file: "connections.png",
        title: "TCP connection setup rate through a ClusterIP",
        ylabel: "connections per second (higher is better)",
        pick: |c| c.conns_per_s,
    },
    Figure {
        file: "latency-p50.png",
        title: "Request/response latency on a kept connection, p50",
        ylabel: "microseconds (lower is better)",
        pick: |c| c.rr_p50_us,
    },
    Figure {
        file: "latency-p99.png",
        title: "Request/response latency on a kept connection, p99",
        ylabel: "microseconds (lower is better)",
        pick: |c| c.rr_p99_us,
    },
];

/// gnuplot's data: one line per size, one column per mode ("NaN" if not run).
fn data(rows: &[TrafficRow], pick: fn(&ClientNumbers) -> f64) -> String {
    let mut s = String::new();
    for r in rows {
        let _ = write!(s, "{}", r.services);
        for m in &r.modes {
            match m {
                Some(c) => {
                    let _ = write!(s, "\t{:.3}", pick(c));
                }
                None => s.push_str("\tNaN"),
            }
        }
        s.push('\n');
    }
    s
}

fn script(fig: &Figure, data_file: &Path, out: &Path) -> String {
    let mut s = format!(
        "set terminal pngcairo size 900,560 font 'sans,10'\n\
         set output '{}'\n\
         set title '{}'\n\
         set xlabel 'Services (log scale)'\n\
         set ylabel '{}'\n\
         set logscale x\n\
         set grid\n\
         set key outside bottom center horizontal\n\
         set datafile missing 'NaN'\n\
         set yrange [0:*]\n\
         plot ",
        out.display(),
        fig.title,
        fig.ylabel
    );
    let lines: Vec<String> = MODES
        .iter()
        .enumerate()
        .map(|(i, m)| {
            format!(
                "'{}' using 1:{} with linespoints lw 2 title '{}'",
                data_file.display(),
                i + 2,
                m
            )
        })
        .collect();
    s.push_str(&lines.join(", "));
    s.push('\n');
    s
}

/// Writes the plots into `dir`; returns their file names.
pub fn draw(rows: &[TrafficRow], dir: &Path, prefix: &str) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    for fig in FIGURES {
        let name = format!("{prefix}{}", fig.file);
        let data_file = dir.join(format!(".{name}.tsv"));
        std::fs::write(&data_file, data(rows, fig.pick))?;
        let out = dir.join(&name);
        let script_file = dir.join(format!(".{name}.gp"));
        std::fs::write(&script_file, script(fig, &data_file, &out))?;
        let status = Command::new("gnuplot")
            .arg(&script_file)
            .status()
            .context("running gnuplot (apt-get install gnuplot-nox)")?;
        let _ = std::fs::remove_file(&data_file);
        let _ = std::fs::remove_file(&script_file);
        if !status.success() {
            bail!("gnuplot failed for {name} ({status})");
        }
        files.push(name);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_has_a_column_per_mode_and_marks_missing_runs() {
        let c = ClientNumbers {
            conns_per_s: 1000.0,
            rr_per_s: 1.0,
            rr_p50_us: 20.0,
            rr_p99_us: 40.0,
            ..Default::default()
        };
        let mut modes = vec![Some(c); MODES.len()];
        modes[3] = None;
        let rows = [TrafficRow {
            services: 1000,
            modes,
            ..Default::default()
        }];
        let text = data(&rows, |c| c.conns_per_s);
        let cols: Vec<&str> = text.trim().split('\t').collect();
        assert_eq!(cols.len(), MODES.len() + 1);
        assert_eq!(cols[0], "1000");
        assert_eq!(cols[4], "NaN");
        assert_eq!(cols[1], "1000.000");
    }
}
