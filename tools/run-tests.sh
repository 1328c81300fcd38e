#!/usr/bin/env bash
# The test command: installs prerequisites, then runs every test (unit, property and
# integration on real qemu-nbd, QEMU, KVM and namespaces), the lints and a smoke run of
# every fuzz target.
#   --long   also the long suites (tests marked `#[ignore = "long: ..."]`: 20 migrations
#            in a row per mode, four guests on one daemon; ~20 min more)
set -euo pipefail
cd "$(dirname "$0")/.."
long=0
for arg in "$@"; do
  case "$arg" in
    --long) long=1 ;;
    *) echo "unknown option $arg (known: --long)" >&2; exit 2 ;;
  esac
done
bash tools/lab/install-prereqs.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo build --workspace --release --all-targets
cargo test --workspace --release -- --test-threads=2
# Every fuzz target (fuzz/, a workspace of its own) for 5 s over its committed corpus, failing
# on any finding; installs cargo-fuzz when it is missing (docs/fuzzing.md).
bash tools/fuzz.sh --ci 5
if [ "$long" = 1 ]; then
  cargo test --release -p pagewise-tests --test migrate_repeat -- --ignored --test-threads=1
  cargo test --release -p pagewise-tests --test load_four_vms -- --ignored --nocapture
fi
