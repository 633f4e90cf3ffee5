//! Small internal helpers, not part of the public API.

pub(crate) mod key_locks;
