//! Sandbox metrics as E2B's API gives them: CPU, memory and disk samples, taken every
//! [`crate::Config::metrics_interval`] from each sandbox's cgroup and root directory.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::cgroup::Usage;
use crate::{SandboxRecord, State};

/// Samples kept per sandbox: an hour at the default interval.
const MAX_SAMPLES: usize = 720;
/// A root with more entries than this is counted only that far: a sample must stay cheap.
const MAX_DISK_ENTRIES: usize = 200_000;

/// One reading of a sandbox's cgroup and disk.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub at: jiff::Timestamp,
    pub usage: Usage,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// E2B's `SandboxMetric`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxMetric {
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// The metric of `sample`, its CPU share measured since `previous` (or since the
/// sandbox started) over all of the sandbox's CPUs.
pub(crate) fn metric(
    sample: &Sample,
    previous: Option<&Sample>,
    started: jiff::Timestamp,
    cpu_count: u32,
    memory_mb: u32,
) -> SandboxMetric {
    let (since_ns, since) = match previous {
        Some(previous) => (previous.usage.cpu_ns, previous.at),
        None => (0, started),
    };
    let wall_ns = sample.at.duration_since(since).as_nanos().max(1) as f64;
    let cpus = f64::from(cpu_count.max(1));
    let used = sample.usage.cpu_ns.saturating_sub(since_ns) as f64;
    let cpu_used_pct = (used / (wall_ns * cpus) * 100.0).clamp(0.0, 100.0);
    SandboxMetric {
        timestamp: sample.at.to_string(),
        timestamp_unix: sample.at.as_second(),
        cpu_count,
        cpu_used_pct: (cpu_used_pct * 100.0).round() / 100.0,
        mem_used: sample.usage.memory_bytes,
        mem_total: sample
            .usage
            .memory_limit
            .unwrap_or(u64::from(memory_mb) << 20),
        mem_cache: sample.usage.cache_bytes,
        disk_used: sample.disk_used,
        disk_total: sample.disk_total,
    }
}

/// envd's own `GET /metrics`: the sandbox's usage now, CPU measured over a short
/// window. In a pod it is the container's cgroup, as mounted inside the container.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EnvdMetrics {
    pub ts: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// How long envd watches the CPU to give its share.
const CPU_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) fn envd_metrics(sandbox: &SandboxRecord) -> std::io::Result<EnvdMetrics> {
    let read = || match &sandbox.group {
        Some(group) => group.usage(),
        None => crate::cgroup::container_usage(Path::new("/sys/fs/cgroup")),
    };
    let first = read()?;
    let started = std::time::Instant::now();
    std::thread::sleep(CPU_WINDOW);
    let usage = read()?;
    let cpu_count = match sandbox.cpu_count {
        0 => crate::cgroup::container_cpus(Path::new("/sys/fs/cgroup")),
        count => count,
    };
    let wall_ns = started.elapsed().as_nanos().max(1) as f64;
    let used = usage.cpu_ns.saturating_sub(first.cpu_ns) as f64;
    let cpu_used_pct = (used / (wall_ns * f64::from(cpu_count.max(1))) * 100.0).clamp(0.0, 100.0);
    let (disk_used, disk_total) = match sandbox.dir.as_deref() {
        Some(root) => (disk_used(root), disk_total(root)),
        // A container's writable layer has no size of its own to read: the filesystem
        // that holds it is what fills.
        // gVisor's root answers a size of 2^63 and nothing used: unknown, so 0.
        None => nix::sys::statvfs::statvfs("/")
            .ok()
            .map(|stat| {
                let size = stat.fragment_size();
                (
                    stat.blocks().saturating_sub(stat.blocks_free()) * size,
                    stat.blocks().saturating_mul(size),
                )
            })
            .filter(|(_, total)| *total < 1 << 60)
            .unwrap_or((0, 0)),
    };
    Ok(EnvdMetrics {
        ts: jiff::Timestamp::now().as_second(),
        cpu_count,
        cpu_used_pct: (cpu_used_pct * 100.0).round() / 100.0,
        mem_total: usage
            .memory_limit
            .unwrap_or(u64::from(sandbox.memory_mb) << 20),
        mem_used: usage.memory_bytes,
        mem_cache: usage.cache_bytes,
        disk_used,
        disk_total,
    })
}

impl EnvdMetrics {
    /// The API's form of one envd reading, which the pod runtime answers with.
    #[cfg(feature = "kubernetes")]
    pub(crate) fn into_metric(self) -> SandboxMetric {
        let at = jiff::Timestamp::from_second(self.ts).unwrap_or_else(|_| jiff::Timestamp::now());
        SandboxMetric {
            timestamp: at.to_string(),
            timestamp_unix: self.ts,
            cpu_count: self.cpu_count,
            cpu_used_pct: self.cpu_used_pct,
            mem_used: self.mem_used,
            mem_total: self.mem_total,
            mem_cache: self.mem_cache,
            disk_used: self.disk_used,
            disk_total: self.disk_total,
        }
    }
}

/// Takes one sample of a local sandbox: its cgroup and its root directory.
pub(crate) fn sample(sandbox: &SandboxRecord) -> Option<Sample> {
    let usage = sandbox.group.as_ref()?.usage().ok()?;
    let root = sandbox.dir.as_deref()?;
    Some(Sample {
        at: jiff::Timestamp::now(),
        usage,
        disk_used: disk_used(root),
        disk_total: disk_total(root),
    })
}

/// The bytes of the files under `root`, counted up to [`MAX_DISK_ENTRIES`] entries.
pub(crate) fn disk_used(root: &Path) -> u64 {
    let mut total = 0;
    let mut seen = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > MAX_DISK_ENTRIES {
                return total;
            }
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    total
}

/// The size of the filesystem `root` is on: sandboxes have no disk quota of their own.
pub(crate) fn disk_total(root: &Path) -> u64 {
    nix::sys::statvfs::statvfs(root)
        .map(|stat| stat.blocks() * stat.fragment_size())
        .unwrap_or(0)
}

/// The metrics of a sandbox between `start` and `end` (unix seconds), oldest first; a
/// sandbox with no sample yet in that range gets one taken now.
pub(crate) fn series(
    sandbox: &SandboxRecord,
    start: Option<i64>,
    end: Option<i64>,
) -> Vec<SandboxMetric> {
    let samples = sandbox.samples.lock().expect("samples").clone();
    let in_range = |sample: &Sample| {
        let at = sample.at.as_second();
        start.is_none_or(|start| at >= start) && end.is_none_or(|end| at <= end)
    };
    let mut series: Vec<SandboxMetric> = samples
        .iter()
        .enumerate()
        .filter(|(_, sample)| in_range(sample))
        .map(|(index, sample)| {
            let previous = index.checked_sub(1).map(|before| &samples[before]);
            metric(
                sample,
                previous,
                sandbox.started_at,
                sandbox.cpu_count,
                sandbox.memory_mb,
            )
        })
        .collect();
    if series.is_empty()
        && end.is_none_or(|end| end >= jiff::Timestamp::now().as_second())
        && let Some(now) = sample(sandbox)
    {
        series.push(metric(
            &now,
            samples.back(),
            sandbox.started_at,
            sandbox.cpu_count,
            sandbox.memory_mb,
        ));
    }
    series
}

/// Samples every running sandbox with a cgroup, each interval, until the server stops.
pub(crate) async fn sample_usage(state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(state.config.metrics_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        let sandboxes: Vec<Arc<SandboxRecord>> = state
            .sandboxes
            .lock()
            .expect("sandboxes")
            .values()
            .filter(|sandbox| sandbox.group.is_some() && !sandbox.is_paused())
            .cloned()
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for sandbox in sandboxes {
                if let Some(sample) = sample(&sandbox) {
                    let mut samples = sandbox.samples.lock().expect("samples");
                    if samples.len() == MAX_SAMPLES {
                        samples.pop_front();
                    }
                    samples.push_back(sample);
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64, cpu_ns: u64) -> Sample {
        Sample {
            at: jiff::Timestamp::from_second(second).unwrap(),
            usage: Usage {
                cpu_ns,
                memory_bytes: 64 << 20,
                cache_bytes: 1 << 20,
                memory_limit: Some(512 << 20),
                oom_kills: 0,
            },
            disk_used: 10,
            disk_total: 100,
        }
    }

    #[test]
    fn cpu_share_is_over_all_cpus_since_the_previous_sample() {
        let started = jiff::Timestamp::from_second(0).unwrap();
        // One CPU busy for the 5 s between samples, of two: 50 %.
        let metric = metric(
            &at(10, 10_000_000_000),
            Some(&at(5, 5_000_000_000)),
            started,
            2,
            512,
        );
        assert_eq!(metric.cpu_used_pct, 50.0);
        assert_eq!(metric.timestamp_unix, 10);
        assert_eq!((metric.mem_used, metric.mem_total), (64 << 20, 512 << 20));
        assert_eq!(metric.cpu_count, 2);
    }

    #[test]
    fn the_first_sample_counts_from_the_start_and_never_exceeds_everything() {
        let started = jiff::Timestamp::from_second(0).unwrap();
        let first = metric(&at(4, 1_000_000_000), None, started, 1, 512);
        assert_eq!(first.cpu_used_pct, 25.0);
        let clamped = metric(&at(1, 9_000_000_000), None, started, 1, 512);
        assert_eq!(clamped.cpu_used_pct, 100.0);
    }
}
