//! What one run measures: wall time, CPU time (`/proc/self/stat`), allocations (a counting
//! global allocator) and peak RSS (`/proc/self/status`, reset through `/proc/self/clear_refs`).

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;
/// Allocations made by the whole process so far (counted by the bench's global allocator).
pub fn allocations() -> u64 {
    crate::counting::allocations()
}

#[global_allocator]
static GLOBAL: crate::counting::Counting = crate::counting::Counting;

/// CPU time (user + system) of the whole process so far, from `/proc/self/stat`.
pub fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after field 2.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// The peak resident set size (kB) since the last [`reset_peak_rss`].
pub fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:")
}

/// The current resident set size (kB).
pub fn rss_kb() -> u64 {
    status_kb("VmRSS:")
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the kernel's peak RSS mark to the current RSS (Linux 4.0+).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One measured phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// Messages in the phase.
    pub messages: u64,
    /// Wall time.
    pub seconds: f64,
    /// Messages per second.
    pub rate: f64,
    /// Process CPU time per message, in microseconds.
    pub cpu_us_per_msg: f64,
    /// Allocations per message (the whole process).
    pub allocs_per_msg: f64,
}

impl Phase {
    /// Uses `active` (the time the messages took, without set-up) for the rate; CPU and
    /// allocations stay those of the whole phase.
    pub fn set_active(&mut self, active: Duration) {
        self.seconds = active.as_secs_f64().max(1e-9);
        self.rate = self.messages as f64 / self.seconds;
    }
}

/// Runs `work` (which handles `messages` messages) and measures it.
pub async fn measure<F, T, E>(messages: usize, work: F) -> Result<(Phase, T), E>
where
    F: Future<Output = Result<T, E>>,
{
    let (cpu0, alloc0, t0) = (cpu_time(), allocations(), Instant::now());
    let out = work.await?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0).as_secs_f64();
    let allocs = allocations().saturating_sub(alloc0);
    let n = messages.max(1) as f64;
    Ok((
        Phase {
            messages: messages as u64,
            seconds,
            rate: messages as f64 / seconds.max(1e-9),
            cpu_us_per_msg: cpu * 1e6 / n,
            allocs_per_msg: allocs as f64 / n,
        },
        out,
    ))
}

/// Latency percentiles of one open-loop run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// The offered rate (messages per second).
    pub rate: f64,
    /// Samples.
    pub samples: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Maximum, microseconds.
    pub max_us: f64,
    /// Up to 200 points of the distribution (microseconds at evenly spaced quantiles), for
    /// the CDF plot.
    pub cdf_us: Vec<f64>,
}

impl Latency {
    /// Percentiles of `nanos` (sorted here).
    pub fn from_nanos(rate: f64, mut nanos: Vec<u64>) -> Self {
        nanos.sort_unstable();
        let us = |q: f64| {
            if nanos.is_empty() {
                return 0.0;
            }
            let i = ((nanos.len() as f64 - 1.0) * q).round() as usize;
            nanos[i.min(nanos.len() - 1)] as f64 / 1000.0
        };
        let points = 200.min(nanos.len());
        let cdf_us = (0..points)
            .map(|i| us(i as f64 / (points.max(2) - 1) as f64))
            .collect();
        Self {
            rate,
            samples: nanos.len(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: us(1.0),
            cdf_us,
        }
    }
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let l = Latency::from_nanos(10.0, (1..=1000).map(|n| n * 1000).collect());
        assert_eq!(l.p50_us, 501.0);
        assert_eq!(l.p99_us, 990.0);
        assert_eq!(l.max_us, 1000.0);
        assert_eq!(l.cdf_us.len(), 200);
    }

    #[test]
    fn reads_the_process_counters() {
        let before = allocations();
        let v: Vec<u64> = (0..1000).collect();
        assert!(allocations() > before, "{}", v.len());
        assert!(rss_kb() > 0);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {}
        assert!(cpu_time() > Duration::ZERO);
    }
}
