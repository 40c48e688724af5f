//! Leader election on a coordination.k8s.io Lease, decided here as a pure
//! function; [`crate::kube_io`] reads and writes the Lease.
//!
//! As in client-go, expiry is judged by this replica's own clock: a record
//! is expired when it has not changed for a lease duration since this
//! replica first saw it, so clocks of different nodes never need to agree.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionConfig {
    /// How long a holder's claim lasts without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops writing; shorter
    /// than `lease_duration`, so it stops before anyone can take over.
    pub renew_deadline: Duration,
    /// How often the Lease is read (and renewed by the leader).
    pub retry_period: Duration,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl ElectionConfig {
    /// Refuses settings under which two replicas could both write.
    pub fn try_new(
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, String> {
        if retry_period.is_zero() || renew_deadline <= retry_period {
            return Err(
                "--leader-elect-renew-deadline must be longer than --leader-elect-retry-period"
                    .into(),
            );
        }
        if lease_duration <= renew_deadline {
            return Err(
                "--leader-elect-lease-duration must be longer than --leader-elect-renew-deadline"
                    .into(),
            );
        }
        Ok(Self {
            lease_duration,
            renew_deadline,
            retry_period,
        })
    }
}

/// The Lease as far as the election needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// `None` or empty: released.
    pub holder: Option<String>,
    /// As written (RFC 3339); only compared, never parsed.
    pub renew_time: Option<String>,
    pub lease_duration_seconds: Option<i32>,
    pub transitions: i32,
}

impl LeaseRecord {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }

    fn duration(&self, fallback: Duration) -> Duration {
        self.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(fallback, Duration::from_secs)
    }
}

/// What to do with the Lease this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No Lease: create it, holding it.
    Create,
    /// Ours: write a new renew time.
    Renew,
    /// Released or expired: write ourselves as holder (one more transition).
    TakeOver { transitions: i32 },
    /// Someone else holds it.
    Follow { holder: String },
}

/// What this replica has seen of the Lease so far.
#[derive(Debug, Default)]
pub struct Observation {
    seen: Option<(LeaseRecord, Instant)>,
}

impl Observation {
    /// Decides this round's step from the Lease just read (`None`: absent).
    pub fn step(
        &mut self,
        me: &str,
        lease: Option<&LeaseRecord>,
        now: Instant,
        cfg: &ElectionConfig,
    ) -> Step {
        let Some(lease) = lease else {
            self.seen = None;
            return Step::Create;
        };
        let since = match &self.seen {
            Some((old, at)) if old == lease => *at,
            _ => {
                self.seen = Some((lease.clone(), now));
                now
            }
        };
        match lease.holder() {
            Some(h) if h == me => Step::Renew,
            None => Step::TakeOver {
                transitions: lease.transitions.saturating_add(1),
            },
            Some(h)
                if now.saturating_duration_since(since) > lease.duration(cfg.lease_duration) =>
            {
                tracing::info!(holder = h, "leader lease expired; taking over");
                Step::TakeOver {
                    transitions: lease.transitions.saturating_add(1),
                }
            }
            Some(h) => Step::Follow { holder: h.into() },
        }
    }
}

/// Whether a leader whose last successful renewal was at `renewed` must stop.
pub fn lost(renewed: Instant, now: Instant, cfg: &ElectionConfig) -> bool {
    now.saturating_duration_since(renewed) > cfg.renew_deadline
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renew: &str) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            renew_time: Some(renew.into()),
            lease_duration_seconds: Some(15),
            transitions: 3,
        }
    }

    #[test]
    fn steps() {
        let cfg = ElectionConfig::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut o = Observation::default();
        assert_eq!(o.step("a", None, at(0), &cfg), Step::Create, "absent");
        let b1 = held_by("b", "t1");
        assert_eq!(
            o.step("a", Some(&b1), at(0), &cfg),
            Step::Follow { holder: "b".into() }
        );
        assert_eq!(
            o.step("a", Some(&b1), at(15), &cfg),
            Step::Follow { holder: "b".into() },
            "exactly a lease duration: not yet"
        );
        // b renews: the clock restarts from when a saw the new record.
        let b2 = held_by("b", "t2");
        assert_eq!(
            o.step("a", Some(&b2), at(14), &cfg),
            Step::Follow { holder: "b".into() }
        );
        assert_eq!(
            o.step("a", Some(&b2), at(28), &cfg),
            Step::Follow { holder: "b".into() },
            "14 s after the renewal was seen"
        );
        assert_eq!(
            o.step("a", Some(&b2), at(30), &cfg),
            Step::TakeOver { transitions: 4 },
            "unchanged for longer than the lease duration"
        );
        // A record's own duration wins over the configured one.
        let mut short = held_by("c", "t3");
        short.lease_duration_seconds = Some(2);
        let mut o = Observation::default();
        o.step("a", Some(&short), at(0), &cfg);
        assert_eq!(
            o.step("a", Some(&short), at(3), &cfg),
            Step::TakeOver { transitions: 4 }
        );
        // Released (empty holder): taken at once.
        let released = LeaseRecord {
            holder: Some(String::new()),
            ..held_by("", "t4")
        };
        assert_eq!(
            Observation::default().step("a", Some(&released), at(0), &cfg),
            Step::TakeOver { transitions: 4 }
        );
        // Ours: renew.
        assert_eq!(
            Observation::default().step("a", Some(&held_by("a", "t5")), at(0), &cfg),
            Step::Renew
        );
    }

    #[test]
    fn a_leader_stops_before_anyone_can_take_over() {
        let cfg = ElectionConfig::default();
        let t0 = Instant::now();
        assert!(!lost(t0, t0 + Duration::from_secs(10), &cfg));
        assert!(lost(t0, t0 + Duration::from_secs(11), &cfg));
        assert!(cfg.renew_deadline < cfg.lease_duration);
    }

    #[test]
    fn unsafe_timings_are_refused() {
        let s = Duration::from_secs;
        assert!(ElectionConfig::try_new(s(15), s(10), s(2)).is_ok());
        assert!(ElectionConfig::try_new(s(10), s(10), s(2)).is_err());
        assert!(ElectionConfig::try_new(s(15), s(2), s(2)).is_err());
        assert!(ElectionConfig::try_new(s(15), s(10), s(0)).is_err());
    }
}
