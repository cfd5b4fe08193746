//! `hearth-worker` binary.

fn main() {}
