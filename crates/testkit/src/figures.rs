//! The embedded sandbox server's figures, measured the same way by `benches/sandboxd.rs`
//! and `benches/operator.rs`: the create → exec `true` → kill round trip (against spawning
//! `true` directly) and stdout streamed through envd (against a plain local pipe).

use std::process::Stdio;
use std::time::{Duration, Instant};

use sandcastle_e2b::client::{E2bClient, SandboxSpec};
use sandcastle_e2b::envd_client::{CommandSpec, ProcessUpdate};
use tokio::io::AsyncReadExt;

pub const ROUND_TRIPS: usize = 200;
const WARM_UP: usize = 5;
pub const STREAM_BYTES: u64 = 256 << 20;
pub const STREAM_RUNS: usize = 7;

/// The 50th and 99th percentile of a set of durations.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub p50: Duration,
    pub p99: Duration,
}

impl Spread {
    pub fn of(mut samples: Vec<Duration>) -> Spread {
        samples.sort();
        Spread {
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
        }
    }
}

pub struct RoundTrips {
    pub sandbox: Spread,
    /// Spawning `true` on the host, each run right after a sandbox round trip.
    pub spawn: Spread,
}

/// The median of the paired stream runs, with the lowest and highest ratio.
pub struct Streaming {
    pub envd: Duration,
    pub pipe: Duration,
    pub ratio: f64,
    pub lowest: f64,
    pub highest: f64,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn mib_per_second(duration: Duration) -> f64 {
    STREAM_BYTES as f64 / (1 << 20) as f64 / duration.as_secs_f64()
}

async fn round_trip(client: &E2bClient) -> Duration {
    let started = Instant::now();
    let sandbox = client
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(60)))
        .await
        .expect("create");
    let output = client
        .envd(&sandbox)
        .start(&CommandSpec::new("/usr/bin/true"))
        .await
        .expect("start")
        .wait()
        .await
        .expect("exec");
    assert_eq!(output.exit_code, 0);
    assert!(
        client
            .kill_sandbox(&sandbox.sandbox_id)
            .await
            .expect("kill")
    );
    started.elapsed()
}

async fn local_true() -> Duration {
    let started = Instant::now();
    let status = tokio::process::Command::new("/usr/bin/true")
        .status()
        .await
        .expect("true runs");
    assert!(status.success());
    started.elapsed()
}

pub async fn round_trips(client: &E2bClient) -> RoundTrips {
    for _ in 0..WARM_UP {
        round_trip(client).await;
    }
    let mut sandbox = Vec::with_capacity(ROUND_TRIPS);
    let mut local = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        sandbox.push(round_trip(client).await);
        local.push(local_true().await);
    }
    RoundTrips {
        sandbox: Spread::of(sandbox),
        spawn: Spread::of(local),
    }
}

fn producer_args() -> [String; 3] {
    ["-c".into(), STREAM_BYTES.to_string(), "/dev/zero".into()]
}

/// Both sides time the bytes only, from the first one to the last: starting a process is
/// the round-trip figure's business, not the stream's.
async fn through_pipe() -> Duration {
    let mut child = tokio::process::Command::new("/usr/bin/head")
        .args(producer_args())
        .stdout(Stdio::piped())
        .spawn()
        .expect("head runs");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut first = None;
    loop {
        let read = stdout.read(&mut buffer).await.expect("read");
        if read == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        total += read as u64;
    }
    let elapsed = first.expect("bytes arrived").elapsed();
    assert!(child.wait().await.expect("wait").success());
    assert_eq!(total, STREAM_BYTES);
    elapsed
}

async fn through_envd(client: &E2bClient) -> Duration {
    let sandbox = client
        .create_sandbox(&SandboxSpec::new("base", Duration::from_secs(300)))
        .await
        .expect("create");
    let envd = client.envd(&sandbox);
    let mut stream = envd
        .start(&CommandSpec {
            args: producer_args().to_vec(),
            ..CommandSpec::new("/usr/bin/head")
        })
        .await
        .expect("start");
    let mut total = 0u64;
    let mut first = None;
    let mut last = None;
    let mut exit_code = None;
    while let Some(update) = stream.next_update().await.expect("stream") {
        match update {
            ProcessUpdate::Stdout(data) => {
                first.get_or_insert_with(Instant::now);
                total += data.len() as u64;
                last = Some(Instant::now());
            }
            ProcessUpdate::End(end) => exit_code = Some(end.exit_code),
            ProcessUpdate::Stderr(_) | ProcessUpdate::Pty(_) => {}
        }
    }
    let elapsed = last.expect("bytes arrived") - first.expect("bytes arrived");
    assert_eq!((total, exit_code), (STREAM_BYTES, Some(0)));
    client
        .kill_sandbox(&sandbox.sandbox_id)
        .await
        .expect("kill");
    elapsed
}

/// Pairs of runs, each pipe run right next to its envd run, so drift in the machine's load
/// hits both sides of a ratio alike; the median pair is reported with the spread.
pub async fn streaming(client: &E2bClient) -> Streaming {
    let mut pairs = Vec::with_capacity(STREAM_RUNS);
    for _ in 0..STREAM_RUNS {
        let pipe = through_pipe().await;
        let envd = through_envd(client).await;
        pairs.push((pipe.as_secs_f64() / envd.as_secs_f64(), pipe, envd));
    }
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, pipe, envd) = pairs[pairs.len() / 2];
    Streaming {
        envd,
        pipe,
        ratio,
        lowest: pairs[0].0,
        highest: pairs[pairs.len() - 1].0,
    }
}
