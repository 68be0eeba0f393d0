//! When to repeat a control-plane request, following the official SDK: the server's
//! `Should-Retry` header decides when present; otherwise 429, 502, 503 and 504 (and failed
//! connections) are retried. The wait is the server's `Retry-After` or a jittered exponential
//! backoff, bounded in attempts and in total time. The decision is a pure function so the
//! policy can be tested without a network.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Statuses retried when the server does not say either way.
const RETRYABLE_STATUSES: [u16; 4] = [429, 502, 503, 504];
/// Larger values are nonsense or hostile; the SDK ignores them the same way.
const MAX_RETRY_AFTER_SECS: u64 = i32::MAX as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// The first backoff step; each later one doubles it.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// No retry is started if its wait would end past this much time since the first
    /// attempt began (request time included).
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            max_retries: 0,
            ..RetryPolicy::default()
        }
    }

    /// The un-jittered backoff steps; the iterator ends when the attempts are used up.
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> + use<> {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(self.max_retries)
            .build()
    }
}

/// What one attempt's outcome says about repeating it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Final,
    /// Retry, after the server's wait if it gave one, else after the backoff step.
    Retry {
        retry_after: Option<Duration>,
    },
}

/// The verdict on an HTTP answer, from its status and the `Should-Retry` and `Retry-After`
/// header values.
pub fn classify_response(
    status: u16,
    should_retry: Option<&str>,
    retry_after: Option<&str>,
) -> Verdict {
    let retry = match should_retry {
        Some(value) => value.trim().eq_ignore_ascii_case("true"),
        None => RETRYABLE_STATUSES.contains(&status),
    };
    if retry {
        Verdict::Retry {
            retry_after: retry_after.and_then(parse_retry_after),
        }
    } else {
        Verdict::Final
    }
}

/// `Retry-After` as whole seconds. The HTTP-date form is not used by the service and is
/// ignored, which falls back to the backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = value.parse().ok()?;
    (secs <= MAX_RETRY_AFTER_SECS).then(|| Duration::from_secs(secs))
}

/// Scales a backoff step into [50 %, 100 %] of itself; `fraction` is uniform in [0, 1).
pub fn jittered(step: Duration, fraction: f64) -> Duration {
    step.mul_f64(0.5 + 0.5 * fraction.clamp(0.0, 1.0))
}

/// How long to wait before the next attempt, or `None` to stop and report this outcome.
/// `step` is the next backoff step (`None` once the attempts are used up), `elapsed` the
/// time since the first attempt began.
pub fn next_delay(
    verdict: Verdict,
    step: Option<Duration>,
    fraction: f64,
    elapsed: Duration,
    policy: &RetryPolicy,
) -> Option<Duration> {
    let Verdict::Retry { retry_after } = verdict else {
        return None;
    };
    let step = step?;
    let delay = retry_after.unwrap_or_else(|| jittered(step, fraction));
    (elapsed + delay < policy.max_elapsed).then_some(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(value: u64) -> Duration {
        Duration::from_secs(value)
    }

    #[test]
    fn statuses_retried_without_a_header() {
        for status in [429, 502, 503, 504] {
            assert_eq!(
                classify_response(status, None, None),
                Verdict::Retry { retry_after: None },
                "{status}"
            );
        }
        for status in [200, 400, 401, 404, 409, 500, 501] {
            assert_eq!(
                classify_response(status, None, None),
                Verdict::Final,
                "{status}"
            );
        }
    }

    #[test]
    fn should_retry_header_is_authoritative() {
        assert_eq!(
            classify_response(500, Some("true"), None),
            Verdict::Retry { retry_after: None }
        );
        assert_eq!(
            classify_response(409, Some(" TRUE "), Some("3")),
            Verdict::Retry {
                retry_after: Some(secs(3))
            }
        );
        assert_eq!(classify_response(503, Some("false"), None), Verdict::Final);
        assert_eq!(
            classify_response(429, Some("no"), Some("1")),
            Verdict::Final
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_only() {
        assert_eq!(parse_retry_after("2"), Some(secs(2)));
        assert_eq!(parse_retry_after(" 0 "), Some(secs(0)));
        assert_eq!(parse_retry_after("1.5"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("99999999999"), None);
        assert_eq!(parse_retry_after("4294967295"), None);
    }

    #[test]
    fn rate_limit_waits_what_the_server_asked() {
        let policy = RetryPolicy::default();
        let verdict = classify_response(429, None, Some("2"));
        assert_eq!(
            next_delay(verdict, Some(secs(0)), 0.3, secs(1), &policy),
            Some(secs(2))
        );
    }

    #[test]
    fn backoff_is_exponential_capped_and_jittered() {
        let policy = RetryPolicy::default();
        let steps: Vec<u128> = policy.backoff().map(|step| step.as_millis()).collect();
        assert_eq!(steps, vec![100, 200, 400]);
        let long = RetryPolicy {
            max_retries: 10,
            ..RetryPolicy::default()
        };
        assert_eq!(
            long.backoff().last().map(|step| step.as_millis()),
            Some(10_000)
        );
        assert_eq!(jittered(secs(2), 0.0), secs(1));
        assert_eq!(jittered(secs(2), 0.5), Duration::from_millis(1500));
        let verdict = Verdict::Retry { retry_after: None };
        let delay = next_delay(verdict, Some(secs(4)), 0.0, secs(0), &policy);
        assert_eq!(delay, Some(secs(2)));
    }

    #[test]
    fn final_answers_and_exhausted_attempts_stop() {
        let policy = RetryPolicy::default();
        assert_eq!(
            next_delay(Verdict::Final, Some(secs(1)), 0.5, secs(0), &policy),
            None
        );
        let verdict = classify_response(503, None, None);
        assert_eq!(next_delay(verdict, None, 0.5, secs(0), &policy), None);
        let mut attempts = 1;
        let mut steps = policy.backoff();
        while next_delay(verdict, steps.next(), 0.5, secs(0), &policy).is_some() {
            attempts += 1;
        }
        assert_eq!(attempts, 1 + policy.max_retries);
        assert_eq!(RetryPolicy::none().backoff().next(), None);
    }

    #[test]
    fn total_time_bounds_the_last_wait() {
        let policy = RetryPolicy {
            max_elapsed: secs(10),
            ..RetryPolicy::default()
        };
        let verdict = classify_response(429, None, Some("5"));
        assert_eq!(
            next_delay(verdict, Some(secs(0)), 0.5, secs(4), &policy),
            Some(secs(5))
        );
        assert_eq!(
            next_delay(verdict, Some(secs(0)), 0.5, secs(5), &policy),
            None
        );
        let verdict = classify_response(429, None, Some("60"));
        assert_eq!(
            next_delay(verdict, Some(secs(0)), 0.5, secs(0), &policy),
            None
        );
    }
}
