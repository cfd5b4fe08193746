//! What every VM backend keeps the same way: its state root on disk ([`state_root`]).
pub(crate) mod state_root;
