//! Partition assignment: balanced per topic, sticky where it costs nothing.
//!
//! For each topic, its partitions are split among the members subscribed to it: every member gets
//! `n / k` or `n / k + 1` partitions. A partition stays with its previous owner when that owner is
//! still subscribed and below its share; the rest go, in partition order, to the member with the
//! fewest partitions (ties broken by member id). With no previous owners this is a plain
//! round-robin over members sorted by id.

use std::collections::{BTreeMap, HashMap};

/// `member id -> [(topic, partition)]`.
pub(crate) type Assignment = BTreeMap<String, Vec<(String, u32)>>;

/// Computes an assignment. `subscriptions` maps member ids to their topics; `partitions` maps
/// topics to their partition counts (unknown topics get nothing); `previous` is the last one.
pub(crate) fn assign(
    subscriptions: &BTreeMap<String, Vec<String>>,
    partitions: &HashMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut out: Assignment = subscriptions.keys().map(|m| (m.clone(), Vec::new())).collect();
    let prev_owner: HashMap<(&str, u32), &str> =
        previous.iter().flat_map(|(m, tps)| tps.iter().map(move |(t, p)| ((t.as_str(), *p), m.as_str()))).collect();
    let mut topics: Vec<&String> = subscriptions.values().flatten().collect();
    topics.sort();
    topics.dedup();
    for topic in topics {
        let Some(&n) = partitions.get(topic) else {
            continue;
        };
        let members: Vec<&String> = subscriptions.iter().filter(|(_, ts)| ts.contains(topic)).map(|(m, _)| m).collect();
        if members.is_empty() || n == 0 {
            continue;
        }
        let k = members.len() as u32;
        let (base, mut extras) = (n / k, n % k);
        let mut held: HashMap<&str, u32> = members.iter().map(|m| (m.as_str(), 0)).collect();
        let mut unassigned = Vec::new();
        for p in 0..n {
            let keep =
                prev_owner.get(&(topic.as_str(), p)).and_then(|owner| held.get_key_value(owner).map(|(k, v)| (*k, *v)));
            match keep {
                Some((owner, count)) if count < base || (count == base && extras > 0) => {
                    if count == base {
                        extras -= 1;
                    }
                    *held.get_mut(owner).expect("member present") += 1;
                    out.get_mut(owner).expect("member present").push((topic.clone(), p));
                }
                _ => unassigned.push(p),
            }
        }
        for p in unassigned {
            let owner = members
                .iter()
                .map(|m| m.as_str())
                .filter(|m| held[m] < base || (held[m] == base && extras > 0))
                .min_by_key(|m| (held[m], *m))
                .expect("shares add up to n");
            if held[owner] == base {
                extras -= 1;
            }
            *held.get_mut(owner).expect("member present") += 1;
            out.get_mut(owner).expect("member present").push((topic.clone(), p));
        }
    }
    for tps in out.values_mut() {
        tps.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(members: &[&str], topic: &str) -> BTreeMap<String, Vec<String>> {
        members.iter().map(|m| (m.to_string(), vec![topic.to_string()])).collect()
    }

    #[test]
    fn three_members_on_six_partitions_get_two_each_and_every_partition_once() {
        let parts = HashMap::from([("t".to_string(), 6)]);
        let a = assign(&subs(&["a", "b", "c"], "t"), &parts, &Assignment::new());
        let mut all: Vec<u32> = a.values().flatten().map(|(_, p)| *p).collect();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
        assert!(a.values().all(|v| v.len() == 2));
    }

    #[test]
    fn a_member_leaving_moves_only_its_partitions() {
        let parts = HashMap::from([("t".to_string(), 6)]);
        let before = assign(&subs(&["a", "b", "c"], "t"), &parts, &Assignment::new());
        let after = assign(&subs(&["a", "b"], "t"), &parts, &before);
        assert_eq!(after["a"].len(), 3);
        assert_eq!(after["b"].len(), 3);
        for p in &before["a"] {
            assert!(after["a"].contains(p), "a keeps what it had");
        }
        for p in &before["b"] {
            assert!(after["b"].contains(p), "b keeps what it had");
        }
    }

    #[test]
    fn uneven_counts_and_unknown_topics_are_handled() {
        let parts = HashMap::from([("t".to_string(), 5)]);
        let mut s = subs(&["a", "b"], "t");
        s.get_mut("b").unwrap().push("missing".into());
        let a = assign(&s, &parts, &Assignment::new());
        assert_eq!(a["a"].len() + a["b"].len(), 5);
        assert!(a["a"].len().abs_diff(a["b"].len()) <= 1);
    }
}
