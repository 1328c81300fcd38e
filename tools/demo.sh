#!/usr/bin/env bash
# pagewise demo: an unmodified QEMU guest whose RAM is served by the pager.
#   1. installs prerequisites, builds pagewise (release) and the lab guest
#   2. creates a swap device, starts `pagewise serve`
#   3. runs the guest under `pagewise vm run` (memverify fills and verifies its memory)
#   4. evicts the guest's cold memory to the swap device (`pagewise evict`), watches memverify
#      keep verifying (evicted pages fault back from the swap device), prints `pagewise stats`
#   5. prints the key figures
# Usage: tools/demo.sh [--mib N] [--hot-mib N] [--seconds N]   (as root; ~2-3 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mib=256 hot_mib=32 seconds=60 ram_mib=512
while [ $# -gt 0 ]; do
  case "$1" in
    --mib) mib=$2; shift 2 ;;
    --hot-mib) hot_mib=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "demo.sh: unknown option $1 (known: --mib N --hot-mib N --seconds N)" >&2; exit 2 ;;
  esac
done
[ "$mib" -lt "$ram_mib" ] || { echo "demo.sh: --mib must stay below the guest's $ram_mib MiB" >&2; exit 2; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "prerequisites"
bash tools/lab/install-prereqs.sh

say "building pagewise (release) and the guest"
cargo build --release --quiet -p agent -p pagewise-preload
target=${CARGO_TARGET_DIR:-$repo/target}
pw="$target/release/pagewise"
bash tools/guest/build.sh "$repo/lab/guest"

work=$(mktemp -d /tmp/pagewise-demo.XXXXXX)
mem=/dev/shm/pagewise-demo-$$
serve_pid="" vm_pid=""
cleanup() {
  [ -n "$vm_pid" ] && kill "$vm_pid" 2>/dev/null && wait "$vm_pid" 2>/dev/null
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  rm -f "$mem"
  echo "demo files kept in $work" >&2
}
trap cleanup EXIT

say "swap device and pager daemon"
"$pw" swapdev create "$work/demo.swap" --size $((ram_mib << 20))
"$pw" serve --socket "$work/pager.sock" --swapdev-dir "$work" >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.log" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$work/serve.log" || { cat "$work/serve.log"; exit 1; }
echo "pagewise serve --socket $work/pager.sock --swapdev-dir $work (pid $serve_pid)"

say "guest under pagewise vm run (memverify: $mib MiB, hot set $hot_mib MiB, ${seconds}s)"
qemu=(qemu-system-x86_64 -accel tcg -m ${ram_mib}M
  -object memory-backend-file,id=mem,size=${ram_mib}M,mem-path=$mem,share=on
  -machine q35,memory-backend=mem
  -kernel "$repo/lab/guest/vmlinuz" -initrd "$repo/lab/guest/initrd.gz"
  -append "console=ttyS0 quiet memverify.mib=$mib memverify.hot_mib=$hot_mib memverify.hot_rate_mibs=8 memverify.verify_secs=5 memverify.duration_secs=$seconds"
  -display none -serial "file:$work/serial.log" -no-reboot)
echo "pagewise vm run --socket $work/pager.sock --name demo -- ${qemu[*]}"
started=$(date +%s%N)
"$pw" vm run --socket "$work/pager.sock" --name demo -- "${qemu[@]}" 2>"$work/qemu.err" &
vm_pid=$!

wait_serial() { # wait_serial PATTERN TIMEOUT_S
  for _ in $(seq $(($2 * 5))); do
    grep -q "$1" "$work/serial.log" 2>/dev/null && return 0
    kill -0 "$vm_pid" 2>/dev/null || break
    sleep 0.2
  done
  echo "demo.sh: '$1' did not appear on the guest console" >&2
  cat "$work/qemu.err" "$work/serial.log" >&2 2>/dev/null || true
  exit 1
}
wait_serial "memverify: filled" 120
boot_ms=$(( ($(date +%s%N) - started) / 1000000 ))
grep "memverify:" "$work/serial.log" | tail -3
wait_serial "memverify: pass 1 " 60
grep "memverify: pass 1 " "$work/serial.log"
rss_before=$(du -k "$mem" | cut -f1)
echo "guest RAM file resident: $((rss_before / 1024)) MiB"

say "pagewise stats (before eviction)"
"$pw" stats --socket "$work/pager.sock" --vm demo

evicted="(pagewise evict not available)"
if "$pw" evict --help >/dev/null 2>&1; then
  target_mib=$((hot_mib + 16))
  say "pagewise evict --vm demo --target-rss ${target_mib}M"
  "$pw" evict --socket "$work/pager.sock" --vm demo --target-rss "${target_mib}M" | tee "$work/evict.out"
  rss_after=$(du -k "$mem" | cut -f1)
  evicted="RAM file resident $((rss_before / 1024)) MiB -> $((rss_after / 1024)) MiB"
  echo "$evicted"
  passes_now=$(grep -c "memverify: pass" "$work/serial.log" || true)
  say "memverify keeps verifying (evicted pages fault back from the swap device)"
  wait_serial "memverify: pass $((passes_now + 1)) " 60
  grep "memverify: pass" "$work/serial.log" | tail -2
  say "pagewise stats (after eviction)"
  "$pw" stats --socket "$work/pager.sock" --vm demo
fi
"$pw" stats --socket "$work/pager.sock" --vm demo --json >"$work/stats.json"

say "waiting for memverify to finish"
wait_serial "memverify: DONE" $((seconds + 60))
wait "$vm_pid" || true
vm_pid=""
done_line=$(grep "memverify: DONE" "$work/serial.log")
echo "$done_line"
"$pw" swapdev inspect "$work/demo.swap" | tee "$work/inspect.out" || true

say "key figures"
command -v python3 >/dev/null && python3 - "$work/stats.json" <<'PY' || true
import json, sys
vm = json.load(open(sys.argv[1]))
vm = vm["vms"][0] if "vms" in vm else vm
m = vm.get("metrics", {})
print(f"faults served: {m.get('faults')} (from swap device: {m.get('faults_to_source')}, zero/first touch: {m.get('faults_avoided')})")
print(f"fault latency: mean {vm.get('fault_latency_mean_us', 0):.1f} us, p50 {vm.get('fault_latency_p50_us')} us, p99 {vm.get('fault_latency_p99_us')} us")
ev = vm.get("eviction", {})
if ev:
    print(f"pages now evicted: {ev.get('evicted_pages')}, resident pages: {ev.get('resident_pages')}, working set estimate: {ev.get('wss', {}).get('wss_pages')} pages")
PY
echo "start to memverify filled: ${boot_ms} ms"
echo "eviction: $evicted"
echo "memverify: ${done_line#memverify: }"
case "$done_line" in *RESULT=PASS*) echo "RESULT: PASS" ;; *) echo "RESULT: FAIL"; exit 1 ;; esac
