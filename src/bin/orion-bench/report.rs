//! Printing samples: min / median / max.

use std::time::Duration;

pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// `min / median / max` in milliseconds.
pub fn triple(samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    format!(
        "{} / **{}** / {}",
        sorted[0].as_millis(),
        sorted[sorted.len() / 2].as_millis(),
        sorted[sorted.len() - 1].as_millis()
    )
}

pub fn line(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let ms = |d: Duration| d.as_millis();
    println!(
        "{what:<34} min {:>5} ms   median {:>5} ms   max {:>5} ms   (n={})",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

/// The numeric fields of `/proc/<process>/stat` after the command name, starting with
/// the state (field 3); `None` if the process is gone.
pub fn proc_stat(process: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User plus system CPU time of a process and of its waited-for children, in clock
/// ticks (`utime + stime`, `cutime + cstime`).
pub fn cpu_ticks(process: &str) -> Option<(u64, u64)> {
    let f = proc_stat(process)?;
    (f.len() >= 15).then(|| (f[11] + f[12], f[13] + f[14]))
}

/// CPU time used so far by this process (all threads) and by its waited-for children.
pub fn cpu_times() -> (Duration, Duration) {
    let tick = |n: u64| Duration::from_secs_f64(n as f64 / clock_ticks() as f64);
    let (own, children) = cpu_ticks("self").unwrap_or_default();
    (tick(own), tick(children))
}

/// Clock ticks per second of `/proc` times.
pub fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Busy CPU time of the whole machine so far (all cores; user, system, interrupts), from
/// `/proc/stat`.
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: skip idle and iowait.
        .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
        .map(|(_, f)| f.parse::<u64>().unwrap_or(0))
        .sum();
    Duration::from_secs_f64(busy as f64 / clock_ticks() as f64)
}
