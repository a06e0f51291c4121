//! What a `ping -i <interval>` run saw: how many answers were lost and the longest outage,
//! for the restart and handover tests.

/// One ping run, parsed from `ping`'s output.
#[derive(Debug)]
pub struct PingRun {
    /// Echo requests sent (the summary line).
    pub sent: usize,
    /// Distinct sequence numbers answered.
    pub answered: usize,
    /// Longest run of consecutive unanswered sequence numbers, in milliseconds.
    pub longest_gap_ms: usize,
}

impl PingRun {
    /// Parses `ping` output sent every `interval_ms`: every `icmp_seq=N` reply line, `sent`
    /// from the summary.
    pub fn parse(text: &str, interval_ms: usize) -> PingRun {
        let sent = text
            .lines()
            .find_map(|l| {
                l.split(" packets transmitted")
                    .next()
                    .filter(|_| l.contains(" packets transmitted"))
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let mut seen = vec![false; sent + 1];
        for l in text.lines().filter(|l| l.contains("bytes from")) {
            let seq = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse::<usize>().ok());
            if let Some(slot) = seq.and_then(|s| seen.get_mut(s)) {
                *slot = true;
            }
        }
        let answered = seen[1..].iter().filter(|s| **s).count();
        let (mut run, mut longest) = (0, 0);
        for s in &seen[1..] {
            run = if *s { 0 } else { run + 1 };
            longest = longest.max(run);
        }
        PingRun {
            sent,
            answered,
            longest_gap_ms: longest * interval_ms,
        }
    }

    /// Requests without an answer.
    pub fn lost(&self) -> usize {
        self.sent - self.answered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_losses() {
        let text = "64 bytes from x: icmp_seq=1 ttl=64\n64 bytes from x: icmp_seq=4 ttl=64\n\
                    --- x ping statistics ---\n5 packets transmitted, 2 received, 60% packet loss\n";
        let r = PingRun::parse(text, 10);
        assert_eq!(
            (r.sent, r.answered, r.lost(), r.longest_gap_ms),
            (5, 2, 3, 20)
        );
    }
}
