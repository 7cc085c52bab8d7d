//! Which fields of a worker's registry hash (`{fr}:worker:<id>`) a tick writes: those that
//! changed since the last tick that answered, and all of them once a lease (which renews
//! the hash's expiry) or after the hash was lost. Pure: the tick itself is
//! `store::functions::tick`.

use std::time::{Duration, Instant};

/// A registry field and its value.
pub type Field = (&'static str, String);

/// What the ticks so far wrote, to send the next one only what it must.
#[derive(Debug, Default)]
pub struct RegistryWrites {
    /// The fields as the last answered tick left them; empty until one answered, or when
    /// the next tick must write them all.
    written: Vec<Field>,
    /// When a tick last wrote every field (and so renewed the hash's expiry).
    all_at: Option<Instant>,
}

impl RegistryWrites {
    /// The fields the next tick sends, from the worker's `current` ones: all of them when
    /// none is known written or the last full write is `every` old (a lease: the hash
    /// expires three leases after its last renewal), else those that changed.
    pub fn to_send(&self, current: &[Field], now: Instant, every: Duration) -> Vec<Field> {
        let all_due = self.written.is_empty()
            || self
                .all_at
                .is_none_or(|at| now.saturating_duration_since(at) >= every);
        if all_due {
            return current.to_vec();
        }
        current
            .iter()
            .filter(|f| !self.written.contains(f))
            .cloned()
            .collect()
    }

    /// Records a tick that answered: it wrote `sent` (from `to_send`) out of `current`.
    /// `hash_created`: the tick found no hash and made one; when it did not carry every field
    /// the next tick sends them all.
    pub fn answered(
        &mut self,
        current: &[Field],
        sent: &[Field],
        now: Instant,
        hash_created: bool,
    ) {
        let all = sent.len() == current.len();
        if hash_created && !all {
            self.written.clear();
            return;
        }
        self.written = current.to_vec();
        if all {
            self.all_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(running: &str) -> Vec<Field> {
        vec![("host", "h".into()), ("running", running.into())]
    }

    #[test]
    fn a_tick_sends_what_changed_and_everything_once_a_lease() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut w = RegistryWrites::default();
        let first = w.to_send(&fields("0"), t0, lease);
        assert_eq!(first, fields("0"), "the first tick writes every field");
        w.answered(&fields("0"), &first, t0, true);
        let t1 = t0 + Duration::from_secs(1);
        assert!(
            w.to_send(&fields("0"), t1, lease).is_empty(),
            "nothing changed"
        );
        let changed = w.to_send(&fields("1"), t1, lease);
        assert_eq!(changed, vec![("running", "1".to_string())]);
        w.answered(&fields("1"), &changed, t1, false);
        assert!(w.to_send(&fields("1"), t1, lease).is_empty());
        let later = t0 + lease;
        assert_eq!(
            w.to_send(&fields("1"), later, lease),
            fields("1"),
            "a lease on"
        );
    }

    #[test]
    fn a_lost_hash_gets_every_field_again() {
        let lease = Duration::from_secs(15);
        let t0 = Instant::now();
        let mut w = RegistryWrites::default();
        w.answered(&fields("0"), &fields("0"), t0, true);
        let t1 = t0 + Duration::from_secs(1);
        let sent = w.to_send(&fields("2"), t1, lease);
        // The hash had expired: the tick made it with only what changed.
        w.answered(&fields("2"), &sent, t1, true);
        assert_eq!(w.to_send(&fields("2"), t1, lease), fields("2"));
        w.answered(&fields("2"), &fields("2"), t1, false);
        assert!(w.to_send(&fields("2"), t1, lease).is_empty());
    }
}
