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
    /// What made this generation from the one before (empty for the first).
    delta: InventoryDelta,
}

impl Snapshot {
    /// The digest, without the changes.
    fn digest(&self) -> InventoryDigest {
        InventoryDigest {
            generation: self.generation,
            hash: self.hash,
            count: self.vms.len() as u32,
            delta: None,
            changes: 0,
        }
    }

    /// The digest a heartbeat carries: with the changes inline when few enough, else their count.
    fn heartbeat_digest(&self) -> InventoryDigest {
        let n = self.delta.changed.len() + self.delta.removed.len();
        let mut digest = self.digest();
        if n <= MAX_INVENTORY_DELTA {
            digest.delta = Some(self.delta.clone());
        } else {
            digest.changes = n as u32;
        }
        digest
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
            return before.digest();
        }
        let next = Arc::new(Snapshot {
            generation: before.generation + 1,
            hash: now.values().fold(0, |h, vm| h ^ vm_hash(vm)),
            vms: now,
            delta: InventoryDelta {
                base: before.generation,
                changed,
                removed,
            },
        });
        g.previous = Some(std::mem::replace(&mut g.current, next));
        g.current.heartbeat_digest()
    }

    /// The latest or the previous generation, if it is `generation`.
    fn generation(&self, generation: u64) -> Result<Arc<Snapshot>, WireError> {
        let g = self.inner.lock();
        if g.current.generation == generation {
            return Ok(g.current.clone());
        }
        match &g.previous {
            Some(p) if p.generation == generation => Ok(p.clone()),
            _ => Err(WireError::conflict(format!(
                "inventory generation {generation} is gone (now {}); page again from the start",
                g.current.generation
            ))),
        }
    }

    /// A page of the changes that made generation `generation`: its removed ids, then its
    /// changed VMs, taken as one list from `offset`.
    pub(crate) fn changes(
        &self,
        generation: u64,
        offset: u32,
        limit: u32,
    ) -> Result<(InventoryDelta, Option<u32>), WireError> {
        let snapshot = self.generation(generation)?;
        let delta = &snapshot.delta;
        let (r, total) = (
            delta.removed.len(),
            delta.removed.len() + delta.changed.len(),
        );
        let start = (offset as usize).min(total);
        let end = (start + limit.clamp(1, MAX_INVENTORY_PAGE) as usize).min(total);
        let page = InventoryDelta {
            base: delta.base,
            removed: delta.removed[start.min(r)..end.min(r)].to_vec(),
            changed: delta.changed[start.max(r) - r..end.max(r) - r].to_vec(),
        };
        Ok((page, (end < total).then_some(end as u32)))
    }

    /// A page of generation `generation` (the latest when `None`).
    pub(crate) fn page(
        &self,
        after: Option<&VmId>,
        limit: u32,
        generation: Option<u64>,
    ) -> Result<Page, WireError> {
        let snapshot = match generation {
            None => self.inner.lock().current.clone(),
            Some(n) => self.generation(n)?,
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
            digest: snapshot.digest(),
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
        assert_eq!(d.changes as usize, MAX_INVENTORY_DELTA + 1);
    }

    #[test]
    fn large_changes_page_as_removed_then_changed_and_rebuild_the_next_generation() {
        let inv = Inventory::default();
        let first: Vec<VmInfo> = (0..1000).map(|i| vm(&format!("old-{i:04}"), 1)).collect();
        inv.observe(first.clone());
        // 600 gone, 400 changed, 700 new: 1,700 changes.
        let mut second: Vec<VmInfo> = (600..1000).map(|i| vm(&format!("old-{i:04}"), 2)).collect();
        second.extend((0..700).map(|i| vm(&format!("new-{i:04}"), 1)));
        let d = inv.observe(second.clone());
        assert_eq!((d.delta.is_none(), d.changes), (true, 1700));
        // Paged with odd limits, then applied to the first generation: the second one.
        let mut view: BTreeMap<VmId, VmInfo> =
            first.into_iter().map(|v| (v.vm_id.clone(), v)).collect();
        let (mut offset, mut pages, mut seen) = (Some(0), 0, 0);
        while let Some(at) = offset {
            let (page, next) = inv.changes(d.generation, at, 333).unwrap();
            assert_eq!(page.base, 1);
            seen += page.removed.len() + page.changed.len();
            for id in &page.removed {
                assert!(view.remove(id).is_some(), "{id} removed twice or unknown");
            }
            for v in page.changed {
                view.insert(v.vm_id.clone(), v);
            }
            offset = next;
            pages += 1;
        }
        assert_eq!((seen, pages), (1700, 6));
        let want: BTreeMap<VmId, VmInfo> =
            second.into_iter().map(|v| (v.vm_id.clone(), v)).collect();
        assert_eq!(view, want);
        assert_eq!(
            inventory_hash(&view.into_values().collect::<Vec<_>>()),
            d.hash
        );
        // Past the end: empty, no next. A limit over the page size is clamped.
        let (page, next) = inv.changes(d.generation, 5000, 10).unwrap();
        assert!(page.removed.is_empty() && page.changed.is_empty() && next.is_none());
        let (page, _) = inv.changes(d.generation, 0, 100_000).unwrap();
        assert_eq!(page.removed.len(), MAX_INVENTORY_PAGE as usize);
        // Two generations on, they are gone.
        inv.observe(vec![vm("x", 1)]);
        inv.observe(vec![vm("y", 1)]);
        assert!(inv.changes(d.generation, 0, 10).is_err());
    }
}
