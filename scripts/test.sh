#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: formatting, lints,
# unit tests and the integration tests (real nbdkit, real clients, real
# images).  This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# nbdsh runs the first python3 on PATH; Debian's has the nbd module.
export PATH="/usr/bin:$HOME/.cargo/bin:$PATH"
cargo fmt --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
