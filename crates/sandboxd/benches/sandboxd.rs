//! Figures for the embedded sandbox server, each against a baseline measured in the same run:
//! the create → exec `true` → kill round trip over 200 sandboxes (against spawning `true`
//! directly), and 256 MiB of stdout streamed through envd (against a plain local pipe of the
//! same bytes). Run with `cargo bench --bench sandboxd`.

use sandcastle_e2b::client::{ClientConfig, E2bClient};
use sandcastle_sandboxd::{Config, Sandboxd};
use sandcastle_testkit::figures::{self, ROUND_TRIPS, STREAM_RUNS, mib_per_second, millis};

#[tokio::main]
async fn main() {
    let root = std::env::temp_dir().join(format!("sandcastle-bench-{}", std::process::id()));
    let server = Sandboxd::start(Config::new(&root))
        .await
        .expect("server starts");
    let client = E2bClient::new(ClientConfig::with_urls(
        server.api_url(),
        server.sandbox_url(),
        "bench",
    ))
    .expect("client");
    println!(
        "embedded sandbox server, isolation: {}",
        if server.is_isolated() {
            "bubblewrap"
        } else {
            "none"
        }
    );
    let trips = figures::round_trips(&client).await;
    println!("create -> exec true -> kill, {ROUND_TRIPS} sandboxes:");
    println!(
        "  sandbox round trip  p50 {:8.2} ms   p99 {:8.2} ms",
        millis(trips.sandbox.p50),
        millis(trips.sandbox.p99)
    );
    println!(
        "  baseline: spawn true p50 {:8.2} ms   p99 {:8.2} ms   (round trip = {:.1}x / {:.1}x the baseline)",
        millis(trips.spawn.p50),
        millis(trips.spawn.p99),
        trips.sandbox.p50.as_secs_f64() / trips.spawn.p50.as_secs_f64(),
        trips.sandbox.p99.as_secs_f64() / trips.spawn.p99.as_secs_f64()
    );
    let stream = figures::streaming(&client).await;
    println!("256 MiB of stdout, median of {STREAM_RUNS} paired runs:");
    println!("  through envd   {:8.1} MiB/s", mib_per_second(stream.envd));
    println!("  plain pipe     {:8.1} MiB/s", mib_per_second(stream.pipe));
    println!(
        "  ratio envd / pipe = {:.2} (target >= 0.5; lowest {:.2}, highest {:.2})",
        stream.ratio, stream.lowest, stream.highest
    );
    server.stop().await;
    let _ = std::fs::remove_dir_all(&root);
}
