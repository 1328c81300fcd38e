#!/usr/bin/env bash
# Run the fuzz targets (fuzz/, cargo-fuzz + libFuzzer with AddressSanitizer, on the stable
# toolchain through RUSTC_BOOTSTRAP=1), one after the other, each for SECONDS (default 60),
# and print each target's executions, rate, edges and findings. Installs cargo-fuzz when it
# is missing. Exits non-zero when any target finds a crash, a hang (an input running > 10 s),
# an allocation over 512 MiB or a leak; the input is in fuzz/artifacts/TARGET/.
#   tools/fuzz.sh [--ci] [SECONDS] [TARGET...]
#   tools/fuzz.sh --cmin [TARGET...]
# New inputs go into fuzz/corpus/TARGET; with --ci (tools/run-tests.sh's smoke run) into a
# temporary directory, so the committed corpora are only read. --cmin minimises each corpus
# to a smallest set of inputs with the same coverage (libFuzzer's -set_cover_merge).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
ci=0 cmin=0
case "${1:-}" in
  --ci) ci=1; shift ;;
  --cmin) cmin=1; shift ;;
esac
secs=60
if [ $cmin = 0 ] && [ $# -gt 0 ]; then
  secs=$1
  shift
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
# -O -a: optimised, with debug assertions and overflow checks (an overflow is a finding).
cargo fuzz build -O -a
bin=target/$(rustc -vV | sed -n 's/^host: //p')/release
export ASAN_OPTIONS=detect_odr_violation=0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
if [ $cmin = 1 ]; then
  for t in "${targets[@]}"; do
    before=$(ls "corpus/$t" | wc -l)
    mkdir -p "$scratch/$t"
    "$bin/$t" -set_cover_merge=1 "$scratch/$t" "corpus/$t" >"$scratch/$t.log" 2>&1 ||
      { tail -20 "$scratch/$t.log"; exit 1; }
    rm -rf "corpus/$t"
    mv "$scratch/$t" "corpus/$t"
    echo "$t: corpus $before -> $(ls "corpus/$t" | wc -l) inputs"
  done
  exit 0
fi
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  dirs=("corpus/$t")
  if [ $ci = 1 ]; then
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t" "corpus/$t")
  fi
  log="$scratch/$t.log"
  if "$bin/$t" -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
    -malloc_limit_mb=512 -artifact_prefix="artifacts/$t/" "${dirs[@]}" >"$log" 2>&1; then
    found=0
  else
    found=1 status=1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  edges=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  if [ $found = 0 ]; then
    echo "$t: ${runs:-?} executions in ${secs}s (${rate:-?}/s), ${edges:-?} edges, no findings"
  else
    echo "$t: FINDING after ${runs:-?} executions (input in fuzz/artifacts/$t/); the log's end:"
    tail -40 "$log" | sed 's/^/  /'
  fi
done
exit $status
