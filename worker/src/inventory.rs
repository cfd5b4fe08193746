//! The worker's inventory as its heartbeats describe it: a digest (generation, hash, count) and
//! the changes since the previous heartbeat, instead of every VM in every heartbeat. The
//! scheduler pages the whole inventory (`list_vms_page`) only when its view does not match, and
//! the pages are served from the snapshot a heartbeat described, so that they are consistent
//! with each other and with the deltas that follow.
//!
//! Cost per heartbeat on the worker: one pass over its VMs (it lists them anyway); on the
//! scheduler: O(changes).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use hearth_messages::{
    InventoryDelta, InventoryDigest, MAX_INVENTORY_DELTA, MAX_INVENTORY_PAGE, VmId, VmInfo,
    WireError, vm_hash,
};
use parking_lot::Mutex;

/// One generation of the inventory.
#[derive(Debug, Default)]
struct Snapshot {
    generation: u64,
    vms: BTreeMap<VmId, VmInfo>,
    hash: u64,
}

impl Snapshot {
    fn digest(&self, delta: Option<InventoryDelta>) -> InventoryDigest {
        InventoryDigest {
            generation: self.generation,
            hash: self.hash,
            count: self.vms.len() as u32,
            delta,
        }
    }
}

/// The inventory's generations: the latest (what the last heartbeat described) and the one
/// before it (a paging scheduler may still be reading it when a heartbeat moves on).
#[derive(Debug, Default)]
pub(crate) struct Inventory {
    inner: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    current: Arc<Snapshot>,
    previous: Option<Arc<Snapshot>>,
}

/// One page of the inventory.
pub(crate) struct Page {
    pub vms: Vec<VmInfo>,
    pub next: Option<VmId>,
    pub digest: InventoryDigest,
}

impl Inventory {
    /// Takes the heartbeat's view of the VMs: a new generation if anything changed, with the
    /// changes when there are few enough to carry.
    pub(crate) fn observe(&self, vms: Vec<VmInfo>) -> InventoryDigest {
        let mut now: BTreeMap<VmId, VmInfo> = BTreeMap::new();
        for mut vm in vms {
            // Notes belong to a create's reply, not to the inventory.
            vm.notes = Vec::new();
            now.insert(vm.vm_id.clone(), vm);
        }
        let mut g = self.inner.lock();
        let before = &g.current;
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        for (id, vm) in &now {
            if before.vms.get(id) != Some(vm) {
                changed.push(vm.clone());
            }
        }
        for id in before.vms.keys() {
            if !now.contains_key(id) {
                removed.push(id.clone());
            }
        }
        if changed.is_empty() && removed.is_empty() {
            return before.digest(None);
        }
        let delta =
            (changed.len() + removed.len() <= MAX_INVENTORY_DELTA).then(|| InventoryDelta {
                base: before.generation,
                changed,
                removed,
            });
        let next = Arc::new(Snapshot {
            generation: before.generation + 1,
            hash: now.values().fold(0, |h, vm| h ^ vm_hash(vm)),
            vms: now,
        });
        g.previous = Some(std::mem::replace(&mut g.current, next));
        g.current.digest(delta)
    }

    /// A page of generation `generation` (the latest when `None`).
    pub(crate) fn page(
        &self,
        after: Option<&VmId>,
        limit: u32,
        generation: Option<u64>,
    ) -> Result<Page, WireError> {
        let snapshot = {
            let g = self.inner.lock();
            match generation {
                None => g.current.clone(),
                Some(n) if g.current.generation == n => g.current.clone(),
                Some(n) => match &g.previous {
                    Some(p) if p.generation == n => p.clone(),
                    _ => {
                        return Err(WireError::conflict(format!(
                            "inventory generation {n} is gone (now {}); page again from the start",
                            g.current.generation
                        )));
                    }
                },
            }
        };
        let limit = limit.clamp(1, MAX_INVENTORY_PAGE) as usize;
        let start = match after {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        };
        let mut range = snapshot.vms.range::<VmId, _>((start, Bound::Unbounded));
        let vms: Vec<VmInfo> = range.by_ref().take(limit).map(|(_, v)| v.clone()).collect();
        let next = match range.next() {
            Some(_) => vms.last().map(|v| v.vm_id.clone()),
            None => None,
        };
        Ok(Page {
            vms,
            next,
            digest: snapshot.digest(None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_messages::{VmState, inventory_hash};

    fn vm(id: &str, activity: u64) -> VmInfo {
        VmInfo {
            vm_id: VmId::new(id).unwrap(),
            state: VmState::Running,
            template: None,
            session: false,
            created_ms: 1,
            last_activity_ms: activity,
            restored_from: None,
            busy: false,
            notes: Vec::new(),
        }
    }

    #[test]
    fn deltas_carry_changes_and_pages_are_consistent() {
        let inv = Inventory::default();
        let d0 = inv.observe(vec![vm("a", 1), vm("b", 1)]);
        assert_eq!(d0.generation, 1);
        assert_eq!(d0.hash, inventory_hash(&[vm("a", 1), vm("b", 1)]));
        let delta = d0.delta.unwrap();
        assert_eq!((delta.base, delta.changed.len()), (0, 2));
        // Nothing changed: same generation, no delta.
        let same = inv.observe(vec![vm("b", 1), vm("a", 1)]);
        assert_eq!((same.generation, same.delta), (1, None));
        // One changed, one gone, one new.
        let d1 = inv.observe(vec![vm("a", 2), vm("c", 1)]);
        let delta = d1.delta.clone().unwrap();
        assert_eq!(delta.base, 1);
        assert_eq!(delta.changed, vec![vm("a", 2), vm("c", 1)]);
        assert_eq!(delta.removed, vec![VmId::new("b").unwrap()]);
        // Pages of the previous generation are still served; older ones are a conflict.
        let p = inv.page(None, 1, Some(1)).unwrap();
        assert_eq!(p.vms, vec![vm("a", 1)]);
        let p = inv.page(p.next.as_ref(), 1, Some(1)).unwrap();
        assert_eq!((p.vms, p.next), (vec![vm("b", 1)], None));
        inv.observe(vec![vm("a", 3)]);
        assert!(inv.page(None, 10, Some(1)).is_err());
        let p = inv.page(None, 0, None).unwrap();
        assert_eq!(p.digest.generation, 3);
        assert_eq!(p.vms.len(), 1, "a limit of 0 is 1");
    }

    #[test]
    fn a_large_change_is_a_digest_without_delta() {
        let inv = Inventory::default();
        let many: Vec<VmInfo> = (0..MAX_INVENTORY_DELTA + 1)
            .map(|i| vm(&format!("vm-{i}"), 1))
            .collect();
        let d = inv.observe(many);
        assert_eq!(d.generation, 1);
        assert!(d.delta.is_none());
        assert_eq!(d.count as usize, MAX_INVENTORY_DELTA + 1);
    }
}
