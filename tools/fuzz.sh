#!/usr/bin/env bash
# Run the migration wire's fuzz targets (fuzz/, cargo-fuzz + libFuzzer on the stable
# toolchain through RUSTC_BOOTSTRAP=1), each for SECONDS (default 60), and print each
# target's executions, rate and findings. Not part of tools/run-tests.sh (too long).
#   tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build -O
status=0
for t in "${targets[@]}"; do
  log=$(mktemp)
  if cargo fuzz run -O "$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    found=0
  else
    found=1 status=1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  echo "$t: ${runs:-?} executions in ${secs}s (${rate:-?}/s), $([ $found = 0 ] && echo "no findings" || echo "FINDING: see fuzz/artifacts/$t, log $log")"
  [ $found = 0 ] && rm -f "$log"
done
exit $status
