//! Recently destroyed VMs, and why the ones that failed did: so that exec on one is
//! `InvalidState` (409, "vm … failed: qemu was killed by signal 9"), not `NotFound`.

use std::collections::{HashMap, VecDeque};

use crate::provider::{VmId, VmState, VmView};

/// How many destroyed VMs stay visible as `Destroyed`.
pub const TOMBSTONE_CAPACITY: usize = 1024;

/// Destroyed VMs as they were last seen. Bounded (the oldest is forgotten first) and in memory
/// only: lost on restart.
#[derive(Debug)]
pub(crate) struct Tombstones {
    order: VecDeque<VmId>,
    graves: HashMap<VmId, Grave>,
    capacity: usize,
}

#[derive(Debug)]
struct Grave {
    view: VmView,
    /// Why the VM failed, when it did not end by a destroy.
    failure: Option<String>,
}

impl Default for Tombstones {
    fn default() -> Self {
        Self::with_capacity(TOMBSTONE_CAPACITY)
    }
}

impl Tombstones {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            graves: HashMap::new(),
            capacity,
        }
    }

    /// Records `view` (its state set to `Destroyed`), forgetting the oldest beyond capacity.
    pub(crate) fn insert(&mut self, view: VmView) {
        self.bury(view, None);
    }

    /// Records `view` with the reason it failed, if it did.
    pub(crate) fn bury(&mut self, mut view: VmView, failure: Option<String>) {
        view.state = VmState::Destroyed;
        self.remove(&view.vm_id);
        self.order.push_back(view.vm_id.clone());
        self.graves
            .insert(view.vm_id.clone(), Grave { view, failure });
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.graves.remove(&oldest);
            }
        }
    }

    pub(crate) fn remove(&mut self, vm_id: &VmId) {
        if self.graves.remove(vm_id).is_some() {
            self.order.retain(|id| id != vm_id);
        }
    }

    pub(crate) fn get(&self, vm_id: &VmId) -> Option<&VmView> {
        self.graves.get(vm_id).map(|g| &g.view)
    }

    /// Why `vm_id` failed, if it is buried and failed.
    pub(crate) fn failure(&self, vm_id: &VmId) -> Option<&str> {
        self.graves.get(vm_id)?.failure.as_deref()
    }

    pub(crate) fn views(&self) -> impl Iterator<Item = &VmView> {
        self.graves.values().map(|g| &g.view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str) -> VmView {
        VmView {
            vm_id: VmId::new(id).unwrap(),
            state: VmState::Running,
            template: None,
            created_ms: 1,
            last_activity_ms: 1,
            stopped_ms: None,
            restored_from: None,
        }
    }

    #[test]
    fn tombstones_are_bounded_and_forget_the_oldest_first() {
        let mut t = Tombstones::with_capacity(2);
        t.insert(view("a"));
        t.bury(view("b"), Some("crashed".into()));
        assert_eq!(t.failure(&VmId::new("b").unwrap()), Some("crashed"));
        t.insert(view("a")); // re-destroyed: now the newest
        t.insert(view("c"));
        assert!(t.get(&VmId::new("b").unwrap()).is_none());
        assert!(t.failure(&VmId::new("b").unwrap()).is_none());
        assert_eq!(
            t.get(&VmId::new("a").unwrap()).unwrap().state,
            VmState::Destroyed
        );
        assert!(t.get(&VmId::new("c").unwrap()).is_some());
        assert_eq!(t.views().count(), 2);
    }
}
