//! The escape suite (`escape.rs`, every attack of issue 10) against the `oci` provider in its
//! default configuration: each VM is a crun container, and every attack must fail the same way.
//! Skips, with the reason printed, without root, crun or tini.

#[path = "escape.rs"]
mod oci_suite;
