//! Rate limit for the ICMP errors the data plane generates.

use std::time::Duration;

/// A token bucket like the kernel's global ICMP limit (`net.ipv4.icmp_msgs_per_sec`, default
/// 1000, and `net.ipv4.icmp_msgs_burst`, default 50): credit accrues at `per_sec` messages
/// a second up to `burst`, each error spends one, an error without credit is suppressed.
///
/// Time is the caller's: `now` is any monotonic clock (e.g. the time since the packet loop
/// started), so the core stays deterministic. A clock that goes backwards adds no credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpLimiter {
    /// Nanoseconds of credit one message costs (1 s / `per_sec`).
    cost_ns: u64,
    /// Most credit held (`burst` messages).
    cap_ns: u64,
    /// Credit now, in nanoseconds.
    credit_ns: u64,
    /// `now` of the last call.
    last: Duration,
}

impl IcmpLimiter {
    /// The kernel's defaults: 1000 messages a second, bursts of 50.
    pub const DEFAULT_PER_SEC: u32 = 1000;
    /// See [`IcmpLimiter::DEFAULT_PER_SEC`].
    pub const DEFAULT_BURST: u32 = 50;

    /// A full bucket: `burst` messages at once, then `per_sec` a second (both at least 1).
    pub fn new(per_sec: u32, burst: u32) -> IcmpLimiter {
        let cost_ns = 1_000_000_000 / u64::from(per_sec.max(1));
        let cap_ns = cost_ns.saturating_mul(u64::from(burst.max(1)));
        IcmpLimiter {
            cost_ns,
            cap_ns,
            credit_ns: cap_ns,
            last: Duration::ZERO,
        }
    }

    /// True if one more error may be sent at `now` (and spends its credit).
    pub fn allow(&mut self, now: Duration) -> bool {
        let elapsed = now.saturating_sub(self.last);
        if now > self.last {
            self.last = now;
        }
        let gained = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.credit_ns = self.credit_ns.saturating_add(gained).min(self.cap_ns);
        if self.credit_ns >= self.cost_ns {
            self.credit_ns -= self.cost_ns;
            true
        } else {
            false
        }
    }
}

impl Default for IcmpLimiter {
    fn default() -> Self {
        IcmpLimiter::new(Self::DEFAULT_PER_SEC, Self::DEFAULT_BURST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_rate() {
        let mut l = IcmpLimiter::default();
        let t0 = ms(5_000);
        let burst = (0..200).filter(|_| l.allow(t0)).count();
        assert_eq!(burst, 50);
        // One more per millisecond afterwards.
        assert!(!l.allow(t0 + Duration::from_micros(999)));
        assert!(l.allow(t0 + ms(1)));
        assert!(!l.allow(t0 + ms(1)));
        // 10 ms: 10 more.
        let later = (0..100).filter(|_| l.allow(t0 + ms(11))).count();
        assert_eq!(later, 10);
        // A long pause refills only up to the burst.
        let refilled = (0..200).filter(|_| l.allow(t0 + ms(60_000))).count();
        assert_eq!(refilled, 50);
    }

    #[test]
    fn over_one_second_at_most_rate_plus_burst() {
        let mut l = IcmpLimiter::new(100, 5);
        // Offered every 100 µs for 1 s: 10,000 tries.
        let sent = (0..10_000u64)
            .filter(|i| l.allow(Duration::from_micros(100 * i)))
            .count();
        assert!((100..=105).contains(&sent), "{sent}");
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let mut l = IcmpLimiter::new(1000, 1);
        assert!(l.allow(ms(100)));
        assert!(!l.allow(ms(50)));
        assert!(!l.allow(ms(100)));
        assert!(l.allow(ms(101)));
        let mut z = IcmpLimiter::new(0, 0);
        assert!(z.allow(ms(0)));
        assert!(!z.allow(ms(999)));
        assert!(z.allow(ms(1000)));
    }
}
