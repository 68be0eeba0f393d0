//! Faults a test can switch on in a running server: counted ones ("the next N requests")
//! for exact scenarios, and random ones at a rate for soak tests. All off by default, so
//! the wire behaviour is unchanged unless a test asks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request as HttpRequest, State as Extract};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sandcastle_e2b::envd::{Code, ConnectError};

use super::{State, api, envd};

#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    /// The next N control-plane requests answer 429 with `Retry-After`.
    pub rate_limited: u32,
    /// The `Retry-After` of every 429, counted or random (at least 1).
    pub retry_after_secs: u32,
    /// The next N control-plane requests answer 503.
    pub unavailable: u32,
    /// Added before every control-plane request is handled.
    pub latency: Duration,
    /// The next N process streams are cut (connection dropped, no end frame) after their
    /// first output.
    pub cut_streams: u32,
    /// The next N process streams are cut before their start event, like
    /// [`Fault::CutStream`].
    pub cut_starts: u32,
    /// The next N creates make a sandbox that vanishes this long after it starts.
    pub vanish_after: Option<(u32, Duration)>,
    /// Faults drawn at random, on top of the counted ones.
    pub random: Option<RandomFaults>,
}

/// A share of all requests, on both listeners (`/health` aside), that meet a fault.
#[derive(Clone, Debug)]
pub struct RandomFaults {
    /// The probability that a request meets a fault, from 0 to 1.
    pub rate: f64,
    /// Seeds the draws. The run is repeatable as far as the requests arrive in the same
    /// order; with concurrent clients it is a reproducible mix, not a replay.
    pub seed: u64,
    /// What a faulted request meets, drawn uniformly among the kinds that can happen to
    /// it: a stream cut only to a request that opens a process stream, a vanishing only
    /// to a sandbox create. A request none of them fits is left alone.
    pub kinds: Vec<Fault>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After` ([`FaultPlan::retry_after_secs`]).
    RateLimited,
    /// 503.
    Unavailable,
    /// The request is handled after this delay.
    Latency(Duration),
    /// The process starts, and its stream is cut before the client hears of it: the
    /// process runs on unobserved.
    CutStream,
    /// The created sandbox vanishes this long after it starts.
    Vanish(Duration),
}

/// What a request is, as far as the faults it can meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Plain,
    CreateSandbox,
    ProcessStream,
}

impl Fault {
    fn fits(&self, request: Request) -> bool {
        match self {
            Fault::RateLimited | Fault::Unavailable | Fault::Latency(_) => true,
            Fault::CutStream => request == Request::ProcessStream,
            Fault::Vanish(_) => request == Request::CreateSandbox,
        }
    }
}

/// How many requests the fault layer saw (`/health` aside) and how many faults it
/// injected, by kind, since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub requests: u64,
    pub rate_limited: u64,
    pub unavailable: u64,
    pub delayed: u64,
    pub cut_streams: u64,
    pub vanished: u64,
}

impl Injected {
    /// Every injected fault.
    pub fn total(&self) -> u64 {
        self.rate_limited + self.unavailable + self.delayed + self.cut_streams + self.vanished
    }
}

#[derive(Debug, Default)]
struct Switch {
    plan: FaultPlan,
    rng: Option<StdRng>,
    injected: Injected,
}

/// The switch tests use to inject faults into a running server.
#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<Mutex<Switch>>);

impl Faults {
    /// Replaces the plan; random draws start over from the new plan's seed.
    pub fn set(&self, plan: FaultPlan) {
        let mut switch = self.0.lock().expect("fault plan");
        switch.rng = plan
            .random
            .as_ref()
            .map(|random| StdRng::seed_from_u64(random.seed));
        switch.plan = plan;
    }

    pub fn clear(&self) {
        self.set(FaultPlan::default());
    }

    /// What was injected so far.
    pub fn injected(&self) -> Injected {
        self.0.lock().expect("fault plan").injected
    }

    pub(crate) fn count(&self, tally: impl FnOnce(&mut Injected) -> &mut u64) {
        *tally(&mut self.0.lock().expect("fault plan").injected) += 1;
    }

    /// Counts a request and draws its random fault, if any.
    pub(crate) fn draw(&self, request: Request) -> Option<Fault> {
        let mut switch = self.0.lock().expect("fault plan");
        switch.injected.requests += 1;
        let Switch { plan, rng, .. } = &mut *switch;
        let (random, rng) = (plan.random.as_ref()?, rng.as_mut()?);
        if rng.random::<f64>() >= random.rate {
            return None;
        }
        let fitting: Vec<Fault> = random
            .kinds
            .iter()
            .filter(|kind| kind.fits(request))
            .copied()
            .collect();
        if fitting.is_empty() {
            return None;
        }
        Some(fitting[rng.random_range(0..fitting.len())])
    }

    pub(crate) fn take(&self, pick: impl FnOnce(&mut FaultPlan) -> &mut u32) -> bool {
        let mut switch = self.0.lock().expect("fault plan");
        let counter = pick(&mut switch.plan);
        if *counter > 0 {
            *counter -= 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn latency(&self) -> Duration {
        self.0.lock().expect("fault plan").plan.latency
    }

    pub(crate) fn retry_after(&self) -> u32 {
        self.0
            .lock()
            .expect("fault plan")
            .plan
            .retry_after_secs
            .max(1)
    }

    /// A cut the counted plan holds for the next process stream.
    pub(crate) fn take_cut(&self) -> Option<envd::Cut> {
        if self.take(|plan| &mut plan.cut_starts) {
            Some(envd::Cut::BeforeStart)
        } else if self.take(|plan| &mut plan.cut_streams) {
            Some(envd::Cut::AfterFirstOutput)
        } else {
            None
        }
    }

    pub(crate) fn take_vanish(&self) -> Option<Duration> {
        let mut switch = self.0.lock().expect("fault plan");
        match &mut switch.plan.vanish_after {
            Some((count, after)) if *count > 0 => {
                *count -= 1;
                Some(*after)
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The layers that apply the faults to a running server.

/// The control plane's faults, counted and random.
pub(crate) async fn inject_api(
    Extract(state): Extract<Arc<State>>,
    mut request: HttpRequest,
    next: Next,
) -> Response {
    let latency = state.faults.latency();
    if !latency.is_zero() {
        state.faults.count(|injected| &mut injected.delayed);
        tokio::time::sleep(latency).await;
    }
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let creates = request.method() == axum::http::Method::POST
        && matches!(request.uri().path(), "/sandboxes" | "/v2/sandboxes");
    let kind = if creates {
        Request::CreateSandbox
    } else {
        Request::Plain
    };
    let drawn = state.faults.draw(kind);
    if state.faults.take(|plan| &mut plan.rate_limited) || drawn == Some(Fault::RateLimited) {
        state.faults.count(|injected| &mut injected.rate_limited);
        let mut response = api::error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded");
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(state.faults.retry_after()));
        return response;
    }
    if state.faults.take(|plan| &mut plan.unavailable) || drawn == Some(Fault::Unavailable) {
        state.faults.count(|injected| &mut injected.unavailable);
        return api::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service is temporarily unavailable",
        );
    }
    match drawn {
        Some(Fault::Latency(delay)) => {
            state.faults.count(|injected| &mut injected.delayed);
            tokio::time::sleep(delay).await;
        }
        Some(Fault::Vanish(after)) => {
            request.extensions_mut().insert(api::Doomed(after));
        }
        _ => {}
    }
    next.run(request).await
}

/// The random faults of [`super::RandomFaults`] on envd calls; the counted ones stay with
/// the control plane, as the scenarios written for them expect.
pub(crate) async fn inject_envd(
    Extract(state): Extract<Arc<State>>,
    mut request: HttpRequest,
    next: Next,
) -> Response {
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let kind = match request.uri().path() {
        "/process.Process/Start" | "/process.Process/Connect" => Request::ProcessStream,
        _ => Request::Plain,
    };
    match state.faults.draw(kind) {
        Some(Fault::RateLimited) => {
            state.faults.count(|injected| &mut injected.rate_limited);
            let mut response = envd::rpc_error(ConnectError::new(
                Code::ResourceExhausted,
                "Rate limit exceeded",
            ));
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(state.faults.retry_after()),
            );
            return response;
        }
        Some(Fault::Unavailable) => {
            state.faults.count(|injected| &mut injected.unavailable);
            return envd::rpc_error(ConnectError::new(
                Code::Unavailable,
                "Service is temporarily unavailable",
            ));
        }
        Some(Fault::Latency(delay)) => {
            state.faults.count(|injected| &mut injected.delayed);
            tokio::time::sleep(delay).await;
        }
        Some(Fault::CutStream) => {
            request.extensions_mut().insert(envd::Cut::BeforeStart);
        }
        Some(Fault::Vanish(_)) | None => {}
    }
    next.run(request).await
}

/// Ends the sandbox `after` its start when a create was doomed by a random fault or the
/// counted plan holds a vanishing.
pub(crate) fn vanish_later(state: &Arc<State>, id: &str, after: Option<Duration>) {
    let Some(after) = state.faults.take_vanish().or(after) else {
        return;
    };
    let (state, id) = (state.clone(), id.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let vanished = || state.faults.count(|injected| &mut injected.vanished);
        state.end_sandbox(&id, vanished).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(rate: f64, seed: u64, kinds: Vec<Fault>) -> Faults {
        let faults = Faults::default();
        faults.set(FaultPlan {
            random: Some(RandomFaults { rate, seed, kinds }),
            ..FaultPlan::default()
        });
        faults
    }

    const ALL: [Fault; 5] = [
        Fault::RateLimited,
        Fault::Unavailable,
        Fault::Latency(Duration::from_secs(2)),
        Fault::CutStream,
        Fault::Vanish(Duration::from_secs(1)),
    ];

    #[test]
    fn draws_hit_about_their_rate_and_only_fitting_requests() {
        let faults = random(0.3, 7, ALL.to_vec());
        let draws: Vec<Option<Fault>> = (0..10_000).map(|_| faults.draw(Request::Plain)).collect();
        let hit = draws.iter().flatten().count();
        assert!((2700..3300).contains(&hit), "{hit} of 10000 faulted");
        assert!(
            draws
                .iter()
                .flatten()
                .all(|fault| fault.fits(Request::Plain))
        );
        let creates: Vec<Fault> = (0..10_000)
            .filter_map(|_| faults.draw(Request::CreateSandbox))
            .collect();
        assert!(
            creates
                .iter()
                .any(|fault| matches!(fault, Fault::Vanish(_)))
        );
        assert!(!creates.contains(&Fault::CutStream));
        let streams: Vec<Fault> = (0..10_000)
            .filter_map(|_| faults.draw(Request::ProcessStream))
            .collect();
        assert!(streams.contains(&Fault::CutStream));
        assert!(
            !streams
                .iter()
                .any(|fault| matches!(fault, Fault::Vanish(_)))
        );
        assert_eq!(faults.injected().requests, 30_000);
    }

    #[test]
    fn the_seed_repeats_the_draws_and_set_starts_over() {
        let sequence = |faults: &Faults| -> Vec<Option<Fault>> {
            (0..200)
                .map(|_| faults.draw(Request::CreateSandbox))
                .collect()
        };
        let first = random(0.5, 42, ALL.to_vec());
        let again = random(0.5, 42, ALL.to_vec());
        let other = random(0.5, 43, ALL.to_vec());
        let drawn = sequence(&first);
        assert_eq!(drawn, sequence(&again));
        assert_ne!(drawn, sequence(&other));
        first.set(FaultPlan {
            random: Some(RandomFaults {
                rate: 0.5,
                seed: 42,
                kinds: ALL.to_vec(),
            }),
            ..FaultPlan::default()
        });
        assert_eq!(drawn, sequence(&first));
    }

    #[test]
    fn no_random_plan_and_no_fitting_kind_draw_nothing() {
        let faults = Faults::default();
        assert!((0..100).all(|_| faults.draw(Request::Plain).is_none()));
        let only_cuts = random(1.0, 1, vec![Fault::CutStream]);
        assert!((0..100).all(|_| only_cuts.draw(Request::Plain).is_none()));
        assert!((0..100).all(|_| only_cuts.draw(Request::ProcessStream) == Some(Fault::CutStream)));
    }
}
