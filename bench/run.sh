#!/usr/bin/env bash
# Runs every benchmark (session2 beside tower-sessions) and writes BENCHMARKS.md
# at the repository's root. Needs the test servers (scripts/services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh --no-browser
cargo build --release -j 2 --manifest-path bench/Cargo.toml
bench/target/release/session2-bench all --output BENCHMARKS.md "$@"
