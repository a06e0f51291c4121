//! `--host-gw-fallback`: the per-peer decision whether pod traffic to a vxlan peer goes over
//! VXLAN or, while the peer's VTEP does not answer and its public IP is on-link, directly via
//! that IP (host-gw style). Pure: the prober feeds it one [`Round`] per probe round and acts
//! on the returned [`Switch`]; the routes themselves are the data plane's business.

use std::time::{Duration, Instant};

/// How pod traffic to a peer is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Path {
    /// Encapsulated to the peer's VTEP (the backend's normal path).
    #[default]
    Vxlan,
    /// `<subnet> via <public IP>` on the external interface.
    Direct,
}

impl Path {
    /// The metric label: `vxlan` or `direct`.
    pub fn label(self) -> &'static str {
        match self {
            Path::Vxlan => "vxlan",
            Path::Direct => "direct",
        }
    }
}

/// When to switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Unanswered VXLAN probes in a row before falling back (and unanswered direct probes
    /// before the peer is named unreachable on the direct path too).
    pub after: u32,
    /// Minimum time between two switches of one peer (flapping damped).
    pub damping: Duration,
}

/// One probe round's facts about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// The peer's public IP is on-link (DirectRouting's test: no gateway on the way).
    pub on_link: bool,
    /// Its VTEP answered the probe sent over VXLAN.
    pub vxlan_answered: bool,
    /// Its public IP answered the direct probe (`None`: not probed, i.e. on the VXLAN path).
    pub direct_answered: Option<bool>,
}

/// What a round changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Now direct: VXLAN missed `rounds` probes in a row and the peer is on-link.
    FellBack {
        /// Unanswered VXLAN probes in a row.
        rounds: u32,
    },
    /// Back on VXLAN: its VTEP answers again.
    Restored,
    /// Back on VXLAN: the public IP is no longer on-link, a direct route cannot work.
    OffLink,
    /// Still direct, but the public IP does not answer either: the peer is unreachable.
    DirectUnreachable {
        /// Unanswered direct probes in a row.
        rounds: u32,
    },
    /// Still direct; the public IP answers again after [`Switch::DirectUnreachable`].
    DirectAnswers,
}

/// One peer's path and the history the decision needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPath {
    /// The current path.
    pub path: Path,
    /// Unanswered VXLAN probes since the last answer.
    pub vxlan_misses: u32,
    /// Unanswered direct probes since the last answer (direct path only).
    pub direct_misses: u32,
    /// When the path last changed (`None`: never, so the first switch is not damped).
    pub last_switch: Option<Instant>,
    /// Path changes so far.
    pub switches: u64,
}

impl PeerPath {
    /// Records one round at `now`; returns the change, if any.
    pub fn observe(&mut self, policy: &Policy, round: Round, now: Instant) -> Option<Switch> {
        if round.vxlan_answered {
            self.vxlan_misses = 0;
        } else {
            self.vxlan_misses = self.vxlan_misses.saturating_add(1);
        }
        let settled = self
            .last_switch
            .is_none_or(|t| now.saturating_duration_since(t) >= policy.damping);
        match self.path {
            Path::Vxlan => {
                if round.on_link && self.vxlan_misses >= policy.after && settled {
                    self.switch(Path::Direct, now);
                    return Some(Switch::FellBack {
                        rounds: self.vxlan_misses,
                    });
                }
                None
            }
            Path::Direct => {
                // Never a direct route to a peer that is not on-link, damped or not.
                if !round.on_link {
                    self.switch(Path::Vxlan, now);
                    return Some(Switch::OffLink);
                }
                if round.vxlan_answered && settled {
                    self.switch(Path::Vxlan, now);
                    return Some(Switch::Restored);
                }
                match round.direct_answered {
                    Some(true) => {
                        let was_down = self.direct_misses >= policy.after;
                        self.direct_misses = 0;
                        was_down.then_some(Switch::DirectAnswers)
                    }
                    Some(false) => {
                        self.direct_misses = self.direct_misses.saturating_add(1);
                        (self.direct_misses == policy.after).then_some(Switch::DirectUnreachable {
                            rounds: self.direct_misses,
                        })
                    }
                    None => None,
                }
            }
        }
    }

    fn switch(&mut self, to: Path, now: Instant) {
        self.path = to;
        self.direct_misses = 0;
        self.last_switch = Some(now);
        self.switches += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONLINK_DOWN: Round = Round {
        on_link: true,
        vxlan_answered: false,
        direct_answered: None,
    };
    const ONLINK_UP: Round = Round {
        on_link: true,
        vxlan_answered: true,
        direct_answered: None,
    };

    fn policy() -> Policy {
        Policy {
            after: 3,
            damping: Duration::from_secs(60),
        }
    }

    #[test]
    fn falls_back_after_n_misses_and_returns_when_vxlan_answers() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        assert_eq!(s.observe(&p, ONLINK_DOWN, t0), None);
        assert_eq!(s.observe(&p, ONLINK_DOWN, t0), None);
        assert_eq!(s.path, Path::Vxlan);
        assert_eq!(
            s.observe(&p, ONLINK_DOWN, t0),
            Some(Switch::FellBack { rounds: 3 })
        );
        assert_eq!(s.path, Path::Direct);
        assert_eq!(s.switches, 1);
        // Still silent: stays direct, nothing new.
        let direct_ok = Round {
            direct_answered: Some(true),
            ..ONLINK_DOWN
        };
        assert_eq!(s.observe(&p, direct_ok, t0 + Duration::from_secs(10)), None);
        // VXLAN answers after the damping window: back.
        let back = t0 + Duration::from_secs(61);
        assert_eq!(s.observe(&p, ONLINK_UP, back), Some(Switch::Restored));
        assert_eq!(s.path, Path::Vxlan);
        assert_eq!(s.switches, 2);
        assert_eq!(s.vxlan_misses, 0);
    }

    #[test]
    fn an_answer_resets_the_count() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        s.observe(&p, ONLINK_DOWN, t0);
        s.observe(&p, ONLINK_DOWN, t0);
        s.observe(&p, ONLINK_UP, t0);
        assert_eq!(s.observe(&p, ONLINK_DOWN, t0), None);
        assert_eq!(s.observe(&p, ONLINK_DOWN, t0), None);
        assert_eq!(s.path, Path::Vxlan);
    }

    #[test]
    fn peers_not_on_link_are_never_switched() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        let offlink = Round {
            on_link: false,
            ..ONLINK_DOWN
        };
        for i in 0..10 {
            assert_eq!(s.observe(&p, offlink, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(s.path, Path::Vxlan);
        assert_eq!(s.switches, 0);
        // Direct, then the public IP stops being on-link: back at once, even when damped.
        let mut s = PeerPath::default();
        for _ in 0..3 {
            s.observe(&p, ONLINK_DOWN, t0);
        }
        assert_eq!(s.path, Path::Direct);
        assert_eq!(
            s.observe(&p, offlink, t0 + Duration::from_secs(1)),
            Some(Switch::OffLink)
        );
        assert_eq!(s.path, Path::Vxlan);
    }

    #[test]
    fn flapping_is_damped_to_one_switch_per_window() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        for _ in 0..3 {
            s.observe(&p, ONLINK_DOWN, t0);
        }
        assert_eq!(s.path, Path::Direct);
        // VXLAN answers 10 s later: too soon to switch back.
        assert_eq!(s.observe(&p, ONLINK_UP, t0 + Duration::from_secs(10)), None);
        assert_eq!(s.path, Path::Direct);
        assert_eq!(
            s.observe(&p, ONLINK_UP, t0 + Duration::from_secs(60)),
            Some(Switch::Restored)
        );
        // Silent again right after returning: stays on VXLAN until the window has passed.
        let t1 = t0 + Duration::from_secs(60);
        for i in 1..=5 {
            assert_eq!(
                s.observe(&p, ONLINK_DOWN, t1 + Duration::from_secs(i)),
                None
            );
        }
        assert_eq!(s.path, Path::Vxlan);
        assert_eq!(
            s.observe(&p, ONLINK_DOWN, t1 + Duration::from_secs(60)),
            Some(Switch::FellBack { rounds: 6 })
        );
        assert_eq!(s.switches, 3);
    }

    #[test]
    fn direct_path_failing_too_is_named_once() {
        let p = policy();
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        for _ in 0..3 {
            s.observe(&p, ONLINK_DOWN, t0);
        }
        let dead = Round {
            direct_answered: Some(false),
            ..ONLINK_DOWN
        };
        assert_eq!(s.observe(&p, dead, t0), None);
        assert_eq!(s.observe(&p, dead, t0), None);
        assert_eq!(
            s.observe(&p, dead, t0),
            Some(Switch::DirectUnreachable { rounds: 3 })
        );
        assert_eq!(s.observe(&p, dead, t0), None);
        let alive = Round {
            direct_answered: Some(true),
            ..ONLINK_DOWN
        };
        assert_eq!(s.observe(&p, alive, t0), Some(Switch::DirectAnswers));
        assert_eq!(s.observe(&p, alive, t0), None);
        assert_eq!(s.path, Path::Direct);
    }

    #[test]
    fn zero_damping_allows_immediate_return() {
        let p = Policy {
            after: 3,
            damping: Duration::ZERO,
        };
        let t0 = Instant::now();
        let mut s = PeerPath::default();
        for _ in 0..3 {
            s.observe(&p, ONLINK_DOWN, t0);
        }
        assert_eq!(s.observe(&p, ONLINK_UP, t0), Some(Switch::Restored));
        assert_eq!(Path::Direct.label(), "direct");
        assert_eq!(Path::Vxlan.label(), "vxlan");
    }
}
