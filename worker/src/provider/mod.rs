//! Worker provider traits.
