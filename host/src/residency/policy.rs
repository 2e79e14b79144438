//! Which resident model to evict: a pure function of what is resident, so the policy is tested
//! by tables, not by loading models.
//!
//! - A victim is idle (no request in flight) and never the model being made room for.
//! - Fair share: every tenant is guaranteed a share of the budget (tenancy config). Victims
//!   come first from tenants holding more than their share, least recently used first, and
//!   otherwise only from the requesting tenant's own models, so one tenant's churn can never
//!   evict another tenant that stays within its share. With one tenant this is plain LRU.
//! - A model's holding is its weights plus what it reserves (its cached stage's capacity).
//! - A model whose eviction would free little (less than a quarter of what it holds: its weights
//!   shared with other resident models) goes only when every other candidate of the same
//!   preference would free as little.
use crate::names::ModelKey;
use std::collections::HashMap;

/// One resident model as the policy sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub key: &'a ModelKey,
    /// Bytes it holds on the device: its weights plus what it reserves (a cached stage's
    /// capacity).
    pub weight: u64,
    /// Requests in flight.
    pub in_use: usize,
    /// When it last served (any monotonic unit; smaller is older).
    pub last_used: u64,
    /// Whether evicting it frees at least a quarter of what it holds (not when other resident
    /// models share its weights).
    pub frees: bool,
}

/// The model to evict to make room for `for_key` (whose tenant needs the room), or `None` when
/// no resident model may go. `shares` are the tenants' guaranteed fractions of `budget`; a
/// tenant missing from it has no guarantee.
pub fn choose_victim<'a>(
    resident: &[Candidate<'a>],
    shares: &HashMap<String, f64>,
    budget: u64,
    for_key: &ModelKey,
) -> Option<&'a ModelKey> {
    let mut usage: HashMap<&str, u64> = HashMap::new();
    for c in resident {
        *usage.entry(c.key.tenant.as_str()).or_default() += c.weight;
    }
    let over_share = |tenant: &str| {
        let share = shares.get(tenant).copied().unwrap_or(0.0);
        usage.get(tenant).copied().unwrap_or(0) as f64 > share * budget as f64
    };
    let least_recent = |pick: &dyn Fn(&Candidate) -> bool| {
        let idle = || {
            resident
                .iter()
                .filter(|c| c.key != for_key && c.in_use == 0 && pick(c))
        };
        idle()
            .filter(|c| c.frees)
            .min_by_key(|c| c.last_used)
            .or_else(|| idle().min_by_key(|c| c.last_used))
            .map(|c| c.key)
    };
    least_recent(&|c| over_share(&c.key.tenant))
        .or_else(|| least_recent(&|c| c.key.tenant == for_key.tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    struct Row {
        /// (tenant, name, MiB held, MiB reserved, in use, last used)
        resident: &'static [(&'static str, &'static str, u64, u64, usize, u64)],
        shares: &'static [(&'static str, f64)],
        budget_mib: u64,
        for_key: (&'static str, &'static str),
        victim: Option<(&'static str, &'static str)>,
        why: &'static str,
    }

    fn run(row: &Row) {
        let keys: Vec<ModelKey> = row
            .resident
            .iter()
            .map(|(t, n, ..)| ModelKey::new(*t, *n, "1"))
            .collect();
        let candidates: Vec<Candidate> = row
            .resident
            .iter()
            .zip(&keys)
            .map(
                |(&(_, _, held, reserved, in_use, last_used), key)| Candidate {
                    key,
                    weight: (held + reserved) * MIB,
                    in_use,
                    last_used,
                    frees: true,
                },
            )
            .collect();
        let shares = row
            .shares
            .iter()
            .map(|(t, s)| (t.to_string(), *s))
            .collect();
        let for_key = ModelKey::new(row.for_key.0, row.for_key.1, "1");
        let got = choose_victim(&candidates, &shares, row.budget_mib * MIB, &for_key)
            .map(|k| (k.tenant.as_str(), k.name.as_str()));
        assert_eq!(got, row.victim, "{}", row.why);
    }

    #[test]
    fn victims_follow_lru_fair_share_and_never_touch_busy_models() {
        let table = [
            Row {
                resident: &[("a", "old", 10, 0, 0, 1), ("a", "new", 10, 0, 0, 5)],
                shares: &[("a", 1.0)],
                budget_mib: 100,
                for_key: ("a", "next"),
                victim: Some(("a", "old")),
                why: "one tenant: plain LRU",
            },
            Row {
                resident: &[("a", "old", 10, 0, 2, 1), ("a", "new", 10, 0, 0, 5)],
                shares: &[("a", 1.0)],
                budget_mib: 100,
                for_key: ("a", "next"),
                victim: Some(("a", "new")),
                why: "a model serving requests is skipped, however old",
            },
            Row {
                resident: &[("a", "busy", 10, 0, 1, 1)],
                shares: &[("a", 1.0)],
                budget_mib: 100,
                for_key: ("a", "next"),
                victim: None,
                why: "nothing idle: no victim",
            },
            Row {
                resident: &[("a", "self", 10, 0, 0, 1)],
                shares: &[("a", 1.0)],
                budget_mib: 100,
                for_key: ("a", "self"),
                victim: None,
                why: "the model being made room for is never its own victim",
            },
            Row {
                resident: &[("a", "a1", 70, 0, 0, 9), ("b", "b1", 10, 0, 0, 1)],
                shares: &[("a", 0.5), ("b", 0.5)],
                budget_mib: 100,
                for_key: ("b", "b2"),
                victim: Some(("a", "a1")),
                why: "a tenant over its share loses first, even its more recent model",
            },
            Row {
                resident: &[("a", "a1", 40, 0, 0, 1), ("b", "b1", 40, 0, 0, 5)],
                shares: &[("a", 0.5), ("b", 0.5)],
                budget_mib: 100,
                for_key: ("b", "b2"),
                victim: Some(("b", "b1")),
                why: "everyone within share: only the requesting tenant's own models",
            },
            Row {
                resident: &[("a", "a1", 40, 0, 0, 1)],
                shares: &[("a", 0.5), ("b", 0.5)],
                budget_mib: 100,
                for_key: ("b", "b1"),
                victim: None,
                why: "another tenant within its share is never evicted for b",
            },
            Row {
                resident: &[("a", "sam", 30, 30, 0, 9), ("b", "b1", 10, 0, 0, 1)],
                shares: &[("a", 0.5), ("b", 0.5)],
                budget_mib: 100,
                for_key: ("b", "b2"),
                victim: Some(("a", "sam")),
                why: "a cached stage's reservation counts: 30 held + 30 reserved is over 50",
            },
            Row {
                resident: &[
                    ("a", "a1", 60, 0, 1, 1),
                    ("a", "a2", 5, 0, 0, 7),
                    ("b", "b1", 10, 0, 0, 2),
                ],
                shares: &[("a", 0.5), ("b", 0.5)],
                budget_mib: 100,
                for_key: ("b", "b2"),
                victim: Some(("a", "a2")),
                why: "over-share tenant's idle model goes; its busy one stays",
            },
            Row {
                resident: &[("x", "x1", 10, 0, 0, 1), ("a", "a1", 10, 0, 0, 2)],
                shares: &[("a", 1.0)],
                budget_mib: 100,
                for_key: ("a", "a2"),
                victim: Some(("x", "x1")),
                why: "a tenant no longer configured has no share: it is over it",
            },
        ];
        for row in &table {
            run(row);
        }
    }

    /// A model whose weights are shared with other resident models frees little when evicted:
    /// the least recently used model that frees more goes first; when none does, plain LRU.
    #[test]
    fn a_victim_that_frees_nothing_goes_last() {
        let (old, new, next) = (
            ModelKey::new("a", "old", "1"),
            ModelKey::new("a", "new", "1"),
            ModelKey::new("a", "next", "1"),
        );
        let candidate = |key, last_used, frees| Candidate {
            key,
            weight: 10 * MIB,
            in_use: 0,
            last_used,
            frees,
        };
        let shares = HashMap::from([("a".to_string(), 1.0)]);
        let both = [candidate(&old, 1, false), candidate(&new, 5, true)];
        assert_eq!(choose_victim(&both, &shares, 100 * MIB, &next), Some(&new));
        let neither = [candidate(&old, 1, false), candidate(&new, 5, false)];
        assert_eq!(
            choose_victim(&neither, &shares, 100 * MIB, &next),
            Some(&old)
        );
    }
}
