#!/usr/bin/env bash
# The test command: installs prerequisites, then runs every test (unit, property and
# integration on real qemu-nbd, QEMU, KVM and namespaces) and the lints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/lab/install-prereqs.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo build --workspace --release --all-targets
cargo test --workspace --release -- --test-threads=2
