//! Which checkpoints a retention policy keeps (`[checkpoint] keep`,
//! `keep_daily`): a pure function of the catalogue, so it is tested
//! without a store and the supervisor can show what it would delete.

use std::collections::HashSet;

use crate::checkpoint::CheckpointInfo;
use crate::error::StoreError;

/// A retention policy over a store's *unnamed* checkpoints (the periodic
/// ones); a named checkpoint was made by a person and is never pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// The newest this many are kept (at least 1).
    pub keep: usize,
    /// Also the newest checkpoint of each of the last this many UTC days
    /// that have one.
    #[serde(default)]
    pub keep_daily: usize,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// The ids `policy` deletes from `infos` (in creation order, as
/// [`crate::Store::list`] gives them). Never the newest checkpoint, never
/// a named one, never one whose id or name is in `protect` (e.g. the
/// checkpoint a recovery restores from).
pub fn plan_retention(
    infos: &[CheckpointInfo],
    policy: &Retention,
    protect: &[&str],
) -> Result<Vec<String>, StoreError> {
    if policy.keep == 0 {
        return Err(StoreError::Retention { checkpoint: "-".into(), reason: "keep must be at least 1" });
    }
    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(newest) = infos.last() {
        keep.insert(&newest.id);
    }
    for i in infos {
        if i.name.is_some() || protect.iter().any(|p| *p == i.id || Some(*p) == i.name.as_deref()) {
            keep.insert(&i.id);
        }
    }
    let periodic: Vec<&CheckpointInfo> = infos.iter().filter(|i| i.name.is_none()).collect();
    for i in periodic.iter().rev().take(policy.keep) {
        keep.insert(&i.id);
    }
    let mut days = Vec::new();
    for i in periodic.iter().rev() {
        let day = i.created_unix_ms / DAY_MS;
        if days.len() >= policy.keep_daily {
            break;
        }
        if !days.contains(&day) {
            days.push(day);
            keep.insert(&i.id);
        }
    }
    Ok(infos.iter().filter(|i| !keep.contains(i.id.as_str())).map(|i| i.id.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(index: u64, ms: u64, name: Option<&str>) -> CheckpointInfo {
        CheckpointInfo {
            id: format!("{index:04}-0000000{index}"),
            name: name.map(str::to_owned),
            index,
            created_unix_ms: ms,
            parent: None,
            experiment_name: "e".into(),
            experiment_digest: "d".into(),
            bytes: 0,
            dir: Default::default(),
        }
    }

    #[test]
    fn keeps_the_newest_n_unnamed_and_every_named() {
        let infos: Vec<_> = (1..=6).map(|i| info(i, i * 1000, (i == 2).then_some("mine"))).collect();
        let gone = plan_retention(&infos, &Retention { keep: 2, keep_daily: 0 }, &[]).unwrap();
        assert_eq!(gone, vec!["0001-00000001", "0003-00000003", "0004-00000004"]);
    }

    #[test]
    fn protected_checkpoints_stay_by_id_or_name() {
        let infos: Vec<_> = (1..=4).map(|i| info(i, i * 1000, None)).collect();
        let gone = plan_retention(&infos, &Retention { keep: 1, keep_daily: 0 }, &["0002-00000002"]).unwrap();
        assert_eq!(gone, vec!["0001-00000001", "0003-00000003"]);
    }

    #[test]
    fn keep_daily_keeps_the_last_of_each_recent_day() {
        // Days 0, 0, 1, 2, 2, 3: keep 1, daily 3 → the newest (day 3) and
        // the last of days 3, 2, 1.
        let ms = [10, 20, DAY_MS + 5, 2 * DAY_MS + 1, 2 * DAY_MS + 9, 3 * DAY_MS];
        let infos: Vec<_> = ms.iter().enumerate().map(|(i, &m)| info(i as u64 + 1, m, None)).collect();
        let gone = plan_retention(&infos, &Retention { keep: 1, keep_daily: 3 }, &[]).unwrap();
        assert_eq!(gone, vec!["0001-00000001", "0002-00000002", "0004-00000004"]);
    }

    #[test]
    fn keep_zero_is_refused_and_the_newest_always_stays() {
        let infos: Vec<_> = (1..=3).map(|i| info(i, i, Some("n"))).collect();
        assert!(plan_retention(&infos, &Retention { keep: 0, keep_daily: 0 }, &[]).is_err());
        assert!(plan_retention(&infos, &Retention { keep: 1, keep_daily: 0 }, &[]).unwrap().is_empty());
        assert!(plan_retention(&[], &Retention { keep: 1, keep_daily: 0 }, &[]).unwrap().is_empty());
    }
}
