//! Retrying without spinning or flooding the log: a capped exponential [`Backoff`] with
//! jitter, and a [`Condition`] that turns a stream of failures into three kinds of log line
//! (started, still there once a minute with a count, cleared).
//!
//! Both are plain state machines: time and randomness are passed in, so they are unit-tested
//! without sleeping. [`Condition::fail`] and [`Condition::clear`] are the logging wrappers the
//! daemon's retry loops call.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a persisting condition is reported while it lasts.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Capped exponential backoff with "equal jitter": the n-th delay is uniformly random in
/// `[d/2, d]` where `d = min(cap, base·2ⁿ)`, so retries of many nodes spread out but never
/// come sooner than half the nominal delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never exceeding `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, with `random` as the jitter source (any value).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let nominal = self
            .base
            .checked_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = nominal / 2;
        let span = u64::try_from((nominal - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = if span == 0 { 0 } else { random % (span + 1) };
        half + Duration::from_nanos(jitter)
    }

    /// [`Backoff::next_delay`] with OS randomness.
    pub fn next_random(&mut self) -> Duration {
        self.next_delay(getrandom::u64().unwrap_or(0))
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// What a [`Condition`] says about a failure or a recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The first failure.
    Started,
    /// Still failing: `failures` since the condition started, which was `for_` ago.
    Persists {
        /// Failures since the start.
        failures: u64,
        /// Time since the start.
        for_: Duration,
    },
    /// It works again after `failures` failures over `lasted`.
    Cleared {
        /// Failures while it lasted.
        failures: u64,
        /// How long it lasted.
        lasted: Duration,
    },
}

/// A persisting fault, reported once when it starts, at most once per [`REPORT_EVERY`] while
/// it lasts, and once when it clears.
#[derive(Debug, Clone)]
pub struct Condition {
    what: &'static str,
    since: Option<Instant>,
    last_report: Option<Instant>,
    failures: u64,
}

impl Condition {
    /// A condition named `what` in the log ("recreating the VXLAN device").
    pub const fn new(what: &'static str) -> Condition {
        Condition {
            what,
            since: None,
            last_report: None,
            failures: 0,
        }
    }

    /// Whether it is failing now.
    pub fn active(&self) -> bool {
        self.since.is_some()
    }

    /// How long it has been failing.
    pub fn duration(&self, now: Instant) -> Option<Duration> {
        self.since.map(|s| now.saturating_duration_since(s))
    }

    /// Records a failure at `now`; returns what to log, if anything.
    pub fn on_failure(&mut self, now: Instant) -> Option<Report> {
        self.failures += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.last_report = Some(now);
            return Some(Report::Started);
        };
        let due = self
            .last_report
            .is_none_or(|t| now.saturating_duration_since(t) >= REPORT_EVERY);
        due.then(|| {
            self.last_report = Some(now);
            Report::Persists {
                failures: self.failures,
                for_: now.saturating_duration_since(since),
            }
        })
    }

    /// Records a success at `now`; returns what to log if the condition was active.
    pub fn on_success(&mut self, now: Instant) -> Option<Report> {
        let since = self.since.take()?;
        let failures = std::mem::take(&mut self.failures);
        self.last_report = None;
        Some(Report::Cleared {
            failures,
            lasted: now.saturating_duration_since(since),
        })
    }

    /// Records a failure and logs it if due (warning level).
    pub fn fail(&mut self, error: &dyn Display) {
        let what = self.what;
        match self.on_failure(Instant::now()) {
            Some(Report::Started) => tracing::warn!(%error, "{what} failed; retrying with backoff"),
            Some(Report::Persists { failures, for_ }) => tracing::warn!(
                %error, failures, for_secs = for_.as_secs(), "{what} still failing"
            ),
            _ => {}
        }
    }

    /// Records a success and logs the recovery if the condition was active.
    pub fn clear(&mut self) {
        let what = self.what;
        if let Some(Report::Cleared { failures, lasted }) = self.on_success(Instant::now()) {
            tracing::info!(
                failures,
                lasted_ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
                "{what} works again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Lowest jitter: exactly half the nominal delay.
        let lows: Vec<Duration> = (0..8).map(|_| b.next_delay(0)).collect();
        let want: Vec<Duration> = [50, 100, 200, 400, 800, 1600, 2500, 2500]
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        assert_eq!(lows, want);
        b.reset();
        assert_eq!(b.attempts(), 0);
        // Highest jitter: the nominal delay; any random value stays within [d/2, d].
        assert_eq!(b.next_delay(50_000_000), Duration::from_millis(100));
        for r in [1, 7, u64::MAX, 123_456_789] {
            let d = b.clone().next_delay(r);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200));
        }
        // Far past the cap: no overflow, still capped.
        for _ in 0..100 {
            let d = b.next_delay(u64::MAX);
            assert!(d <= Duration::from_secs(5));
        }
        assert!(b.next_random() >= Duration::from_millis(2500));
    }

    #[test]
    fn condition_reports_start_once_a_minute_and_clear() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut c = Condition::new("test");
        assert!(!c.active());
        assert_eq!(c.on_success(at(0)), None, "nothing to clear");
        assert_eq!(c.on_failure(at(0)), Some(Report::Started));
        // 10 failures a second for 59 s: silent.
        for i in 1..590 {
            assert_eq!(c.on_failure(at(i * 100)), None, "failure {i}");
        }
        assert_eq!(
            c.on_failure(at(60_000)),
            Some(Report::Persists {
                failures: 591,
                for_: Duration::from_secs(60)
            })
        );
        assert_eq!(c.on_failure(at(60_100)), None);
        assert_eq!(c.duration(at(61_000)), Some(Duration::from_secs(61)));
        assert_eq!(
            c.on_success(at(61_000)),
            Some(Report::Cleared {
                failures: 592,
                lasted: Duration::from_secs(61)
            })
        );
        assert!(!c.active());
        assert_eq!(c.on_success(at(62_000)), None, "cleared once");
        // A new episode starts afresh.
        assert_eq!(c.on_failure(at(63_000)), Some(Report::Started));
    }
}
