//! The `session2` command (placeholder until the CLI lands).

fn main() {}
