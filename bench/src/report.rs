//! The result of a run: printed for humans, as JSON, and as an SVG plot.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::latency::Percentiles;

/// One workload's result. `--json` prints exactly this.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The exact command line.
    pub command: String,
    /// Workload name.
    pub workload: String,
    /// Records measured (warm-up excluded).
    pub records: u64,
    /// Bytes of record values measured.
    pub bytes: u64,
    /// Seconds measured.
    pub elapsed_secs: f64,
    /// Throughput in records per second.
    pub records_per_sec: f64,
    /// Throughput in MB (10^6 bytes) per second of record values.
    pub mb_per_sec: f64,
    /// Latency percentiles in microseconds (what is measured depends on the workload).
    pub latency_us: Percentiles,
    /// What `latency_us` measures.
    pub latency_measures: String,
    /// Records per second in each second of the run.
    pub timeline: Vec<f64>,
    /// Latency percentile curve: (nines, µs).
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

impl Report {
    /// Prints the human summary.
    pub fn print(&self) {
        println!("workload      {}", self.workload);
        println!("command       {}", self.command);
        println!("records       {}", self.records);
        println!("elapsed       {:.3} s", self.elapsed_secs);
        println!("throughput    {:.0} records/s   {:.1} MB/s", self.records_per_sec, self.mb_per_sec);
        let l = &self.latency_us;
        println!(
            "latency (µs)  p50 {:.0}   p90 {:.0}   p99 {:.0}   p99.9 {:.0}   max {:.0}   ({})",
            l.p50, l.p90, l.p99, l.p999, l.max, self.latency_measures
        );
    }

    /// Writes an SVG with the latency percentile curve and throughput over time.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (upper, lower) = root.split_vertically(400);
        let max_lat = self.curve.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&upper)
            .caption(
                format!("{}: latency by percentile ({})", self.workload, self.latency_measures),
                ("sans-serif", 18),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..5f64, 0f64..max_lat)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (µs)")
            .x_label_formatter(&|x| format!("{}%", 100.0 * (1.0 - 10f64.powf(-x))))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.draw_series(LineSeries::new(self.curve.iter().copied(), &BLUE)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let max_rate = self.timeline.iter().copied().fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&lower)
            .caption("throughput over time", ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..(self.timeline.len().max(1) as f64), 0f64..max_rate)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart.configure_mesh().x_desc("seconds").y_desc("records/s").draw().map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(self.timeline.iter().enumerate().map(|(i, r)| (i as f64 + 1.0, *r)), &RED))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}
