//! Per-VM async locks. Jobs and commands on one VM never interleave; waiting callers are served in
//! arrival order (tokio's mutex is FIFO), and a waiting exec waits instead of being rejected.

use std::sync::Arc;

use dashmap::DashMap;
use hearth_messages::VmId;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The lock table. Entries are created on first use and dropped when no one holds or awaits them.
#[derive(Debug, Default)]
pub(crate) struct VmLocks {
    locks: DashMap<VmId, Arc<Mutex<()>>>,
    /// Background processes running per VM (watched by the data plane). They do not take the
    /// lock — foreground commands run beside them — but they make the VM busy.
    background: DashMap<VmId, usize>,
}

impl VmLocks {
    /// Waits for the VM's lock.
    pub(crate) async fn lock(&self, vm_id: &VmId) -> OwnedMutexGuard<()> {
        let mutex = self.locks.entry(vm_id.clone()).or_default().clone();
        mutex.lock_owned().await
    }

    /// Whether someone holds the VM's lock (a command, file transfer or job runs on it, or a
    /// waiter was just handed the lock). Never creates an entry.
    pub(crate) fn is_busy(&self, vm_id: &VmId) -> bool {
        self.background.contains_key(vm_id)
            || self
                .locks
                .get(vm_id)
                .is_some_and(|mutex| mutex.try_lock().is_err())
    }

    /// A background process started running on the VM: busy until [`Self::background_ended`].
    pub(crate) fn background_started(&self, vm_id: &VmId) {
        *self.background.entry(vm_id.clone()).or_default() += 1;
    }

    /// A background process counted by [`Self::background_started`] ended (or stopped being
    /// watched).
    pub(crate) fn background_ended(&self, vm_id: &VmId) {
        self.background.remove_if_mut(vm_id, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// Forgets the VM's lock if nobody holds or awaits it (after a destroy or rename, with the
    /// guard already dropped).
    pub(crate) fn forget_if_idle(&self, vm_id: &VmId) {
        self.locks
            .remove_if(vm_id, |_, mutex| Arc::strong_count(mutex) == 1);
    }

    /// Number of lock entries (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.locks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let locks = Arc::new(VmLocks::default());
        let vm = VmId::new("vm").unwrap();
        let first = locks.lock(&vm).await;
        let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..5 {
            let (locks, vm, order) = (locks.clone(), vm.clone(), order.clone());
            handles.push(tokio::spawn(async move {
                let _g = locks.lock(&vm).await;
                order.lock().push(i);
            }));
            // Let each waiter enqueue before the next one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(first);
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
        locks.forget_if_idle(&vm);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn busy_while_held_and_asking_creates_no_entry() {
        let locks = VmLocks::default();
        let vm = VmId::new("vm").unwrap();
        assert!(!locks.is_busy(&vm));
        assert_eq!(locks.len(), 0, "asking must not create an entry");
        let guard = locks.lock(&vm).await;
        assert!(locks.is_busy(&vm));
        assert!(!locks.is_busy(&VmId::new("other").unwrap()));
        drop(guard);
        assert!(!locks.is_busy(&vm));
        locks.forget_if_idle(&vm);
        assert_eq!(locks.len(), 0);
    }
}
