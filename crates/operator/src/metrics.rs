//! The operator's Prometheus metrics. Reconcile series carry controller-runtime's names and
//! labels so dashboards and alerts written for Go operators work unchanged; the rest are
//! Sandcastle's own, with bounded labels (never an object's name).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::core::DeserializeGuard;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use sandcastle_api::{AgentTask, TaskPhase};

/// `sandcastle_agent_cost_usd_total`, summed in whole nano-dollars: the costs are
/// decimals (the CLI's, cut to 9 places), and a float sum of them would show digits no
/// task reported (five tasks at 0.0024 are 0.011999999999999999 as floats).
#[derive(Debug, Default)]
struct Cost {
    nanodollars: AtomicU64,
}

impl Collector for Cost {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let total = self.nanodollars.load(std::sync::atomic::Ordering::Relaxed);
        // Exact for any total below 2^53 nano-dollars (9 million dollars).
        let counter = ConstCounter::new(total as f64 / 1e9);
        let metric = encoder.encode_descriptor(
            "sandcastle_agent_cost_usd",
            "Cost in US dollars the agents reported",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

/// A non-negative decimal number of dollars as whole nano-dollars; places beyond the
/// ninth are dropped. `None` for anything else.
fn nanodollars(text: &str) -> Option<u64> {
    let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|byte| byte.is_ascii_digit())
    {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut places: String = fraction.chars().take(9).collect();
    while places.len() < 9 {
        places.push('0');
    }
    whole
        .checked_mul(1_000_000_000)?
        .checked_add(places.parse().ok()?)
}

/// What the `/metrics` endpoint answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: &'static str,
    result: ReconcileResult,
}

/// controller-runtime's values for the `result` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReconcileResult {
    success,
    error,
    requeue_after,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClaimLabels {
    result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every series the operator exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_errors: Family<ControllerLabels, Counter>,
    reconcile_time: HistogramFamily<ControllerLabels>,
    tasks: Family<PhaseLabels, Gauge>,
    task_duration: HistogramFamily<OutcomeLabels>,
    sandbox_create: Histogram,
    tokens: Family<TokenLabels, Counter>,
    cost: Arc<Cost>,
    provider_requests: Family<CodeLabels, Counter>,
    leader: Gauge,
    pool_claims: Family<ClaimLabels, Counter>,
    warm: Gauge,
    /// Each pool's ready count (by template key, never a label), summed into `warm`.
    warm_by_pool: Mutex<std::collections::HashMap<String, i64>>,
    /// The task caches of the running controllers; tasks by phase are counted from them
    /// at scrape time, so the gauge can never drift from what the API server holds.
    task_stores: Mutex<Vec<Store<DeserializeGuard<AgentTask>>>>,
}

const PHASES: [(TaskPhase, &str); 6] = [
    (TaskPhase::Pending, "Pending"),
    (TaskPhase::Queued, "Queued"),
    (TaskPhase::Provisioning, "Provisioning"),
    (TaskPhase::Running, "Running"),
    (TaskPhase::Succeeded, "Succeeded"),
    (TaskPhase::Failed, "Failed"),
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::default();
        registry.register(
            "controller_runtime_reconcile",
            "Reconciles per controller and result",
            reconciles.clone(),
        );
        let reconcile_errors = Family::default();
        registry.register(
            "controller_runtime_reconcile_errors",
            "Reconciles that ended in an error",
            reconcile_errors.clone(),
        );
        let reconcile_time: HistogramFamily<ControllerLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 15)));
        registry.register(
            "controller_runtime_reconcile_time_seconds",
            "Time one reconcile took",
            reconcile_time.clone(),
        );
        let tasks = Family::default();
        registry.register(
            "sandcastle_agenttasks",
            "AgentTasks by phase",
            tasks.clone(),
        );
        let task_duration: HistogramFamily<OutcomeLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 14)));
        registry.register_with_unit(
            "sandcastle_agenttask_duration",
            "Time from a task's start to its end, by outcome",
            Unit::Seconds,
            task_duration.clone(),
        );
        let sandbox_create = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        registry.register_with_unit(
            "sandcastle_sandbox_create",
            "Latency of creating a sandbox on the provider",
            Unit::Seconds,
            sandbox_create.clone(),
        );
        let tokens = Family::default();
        registry.register(
            "sandcastle_agent_tokens",
            "Model tokens the agents reported, by kind",
            tokens.clone(),
        );
        let cost = Arc::new(Cost::default());
        registry.register_collector(Box::new(cost.clone()));
        let provider_requests = Family::default();
        registry.register(
            "sandcastle_provider_requests",
            "Requests to the sandbox provider's API by HTTP status code (`error` when none came back)",
            provider_requests.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "sandcastle_leader",
            "1 while this process holds the leader lease and reconciles",
            leader.clone(),
        );
        let pool_claims = Family::default();
        registry.register(
            "sandcastle_pool_claims",
            "Tasks of templates with a warm pool, by whether they took a warm sandbox (`warm`) or found none and created one (`cold`)",
            pool_claims.clone(),
        );
        let warm = Gauge::default();
        registry.register(
            "sandcastle_warm_sandboxes",
            "Idle sandboxes of the current build in all warm pools, as last seen",
            warm.clone(),
        );
        Metrics {
            pool_claims,
            warm,
            warm_by_pool: Mutex::default(),
            registry,
            reconciles,
            reconcile_errors,
            reconcile_time,
            tasks,
            task_duration,
            sandbox_create,
            tokens,
            cost,
            provider_requests,
            leader,
            task_stores: Mutex::default(),
        }
    }

    pub fn reconciled(&self, controller: &'static str, result: ReconcileResult, took: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels { controller, result })
            .inc();
        if result == ReconcileResult::error {
            self.reconcile_errors
                .get_or_create(&ControllerLabels { controller })
                .inc();
        }
        self.reconcile_time
            .get_or_create(&ControllerLabels { controller })
            .observe(took.as_secs_f64());
    }

    pub fn pool_claimed(&self, warm: bool) {
        let result = if warm { "warm" } else { "cold" };
        self.pool_claims
            .get_or_create(&ClaimLabels { result })
            .inc();
    }

    /// The ready count of one pool; 0 for a pool that is gone.
    pub fn pool_ready(&self, pool: &str, ready: i64) {
        let mut by_pool = self.warm_by_pool.lock().expect("warm pools");
        if ready == 0 {
            by_pool.remove(pool);
        } else {
            by_pool.insert(pool.to_string(), ready);
        }
        self.warm.set(by_pool.values().sum());
    }

    pub fn sandbox_created(&self, took: Duration) {
        self.sandbox_create.observe(took.as_secs_f64());
    }

    /// A task reached Succeeded or Failed after `took`, having used these tokens and cost.
    pub fn task_finished(
        &self,
        succeeded: bool,
        took: Duration,
        usage: Option<&sandcastle_api::Usage>,
    ) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.task_duration
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
        let Some(usage) = usage else { return };
        for (kind, count) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_creation_input", usage.cache_creation_input_tokens),
            ("cache_read_input", usage.cache_read_input_tokens),
        ] {
            self.tokens
                .get_or_create(&TokenLabels { kind })
                .inc_by(count.max(0) as u64);
        }
        if let Some(nanos) = usage.cost_usd.as_deref().and_then(nanodollars) {
            self.cost
                .nanodollars
                .fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// One answer (or transport failure) from the provider's API.
    pub fn provider_request(&self, status: Option<u16>) {
        let code = status.map_or_else(|| "error".to_string(), |status| status.to_string());
        self.provider_requests
            .get_or_create(&CodeLabels { code })
            .inc();
    }

    /// Counts a client's requests in `sandcastle_provider_requests_total`.
    pub fn request_observer(self: &Arc<Self>) -> sandcastle_e2b::client::RequestObserver {
        let metrics = self.clone();
        sandcastle_e2b::client::RequestObserver::new(move |status| metrics.provider_request(status))
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn watch_tasks(&self, store: Store<DeserializeGuard<AgentTask>>) {
        self.task_stores.lock().expect("task stores").push(store);
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        self.count_tasks();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }

    fn count_tasks(&self) {
        let stores = self.task_stores.lock().expect("task stores");
        let mut counts = [0i64; PHASES.len()];
        for store in stores.iter() {
            for guard in store.state() {
                let Ok(task) = &guard.0 else { continue };
                let phase = task
                    .status
                    .as_ref()
                    .and_then(|status| status.phase)
                    .unwrap_or(TaskPhase::Pending);
                if let Some(slot) = PHASES.iter().position(|(known, _)| *known == phase) {
                    counts[slot] += 1;
                }
            }
        }
        for ((_, phase), count) in PHASES.iter().zip(counts) {
            self.tasks.get_or_create(&PhaseLabels { phase }).set(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_read_as_exact_decimals() {
        let cases = [
            ("0.0024", Some(2_400_000)),
            ("1", Some(1_000_000_000)),
            ("12.5", Some(12_500_000_000)),
            (".5", Some(500_000_000)),
            ("0.0000000019", Some(1)),
            ("0", Some(0)),
            ("-1", None),
            ("1e-3", None),
            ("", None),
            (".", None),
            ("abc", None),
        ];
        for (text, expected) in cases {
            assert_eq!(nanodollars(text), expected, "{text:?}");
        }
    }

    #[test]
    fn the_cost_total_is_the_sum_of_the_decimals() {
        let metrics = Metrics::new();
        let usage: sandcastle_api::Usage =
            serde_json::from_value(serde_json::json!({"costUSD": "0.0024"})).unwrap();
        for _ in 0..5 {
            metrics.task_finished(true, Duration::from_secs(1), Some(&usage));
        }
        let text = metrics.encode();
        assert!(
            text.lines()
                .any(|line| line == "sandcastle_agent_cost_usd_total 0.012"),
            "{text}"
        );
    }

    #[test]
    fn series_carry_controller_runtime_names_and_count_what_they_see() {
        let metrics = Metrics::new();
        metrics.reconciled(
            "agenttask",
            ReconcileResult::success,
            Duration::from_millis(20),
        );
        metrics.reconciled(
            "agenttask",
            ReconcileResult::error,
            Duration::from_millis(3),
        );
        metrics.provider_request(Some(201));
        metrics.provider_request(None);
        metrics.task_finished(
            true,
            Duration::from_secs(3),
            Some(&sandcastle_api::Usage {
                input_tokens: 10,
                output_tokens: 5,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 2,
                cost_usd: Some("0.25".into()),
            }),
        );
        metrics.set_leader(true);
        let text = metrics.encode();
        for line in [
            "controller_runtime_reconcile_total{controller=\"agenttask\",result=\"success\"} 1",
            "controller_runtime_reconcile_total{controller=\"agenttask\",result=\"error\"} 1",
            "controller_runtime_reconcile_errors_total{controller=\"agenttask\"} 1",
            "controller_runtime_reconcile_time_seconds_count{controller=\"agenttask\"} 2",
            "sandcastle_provider_requests_total{code=\"201\"} 1",
            "sandcastle_provider_requests_total{code=\"error\"} 1",
            "sandcastle_agenttask_duration_seconds_count{outcome=\"succeeded\"} 1",
            "sandcastle_agent_tokens_total{kind=\"input\"} 10",
            "sandcastle_agent_tokens_total{kind=\"cache_read_input\"} 2",
            "sandcastle_agent_cost_usd_total 0.25",
            "sandcastle_leader 1",
            "sandcastle_agenttasks{phase=\"Running\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
