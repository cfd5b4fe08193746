//! Hearth scheduler: warm pools per template, claim by rename, session lifetimes and durable state.
