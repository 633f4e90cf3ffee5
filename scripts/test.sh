#!/usr/bin/env bash
# The whole test suite: brings up the test servers (installing them where
# missing), then runs every test of the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo test --workspace --all-features -j 2 "$@"
