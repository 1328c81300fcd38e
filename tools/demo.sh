#!/usr/bin/env bash
# pagewise demo: an unmodified QEMU guest whose RAM is served by the pager, moved between two
# hosts with an agile live migration.
#   1. installs prerequisites, builds pagewise (release) and the lab guest
#   2. brings up the two-host lab (network namespaces src/dst joined by a 30 MB/s tc-shaped
#      link, a store host running qemu-nbd with the VM's shared swap device)
#   3. starts `pagewise serve` on both hosts (migration endpoints, one pre-shared key)
#   4. runs the guest under `pagewise vm run` on src (memverify fills and verifies its memory)
#   5. evicts the guest's cold memory to the shared swap device (`pagewise evict`), watches
#      memverify keep verifying, prints `pagewise stats`
#   6. `pagewise migrate --mode agile` to dst: only the working set crosses the link, cold pages
#      are read from the shared swap device there; memverify finishes on dst
#   7. prints the key figures
# Usage: tools/demo.sh [--mib N] [--hot-mib N] [--seconds N]   (as root; ~3 minutes)
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
export PAGEWISE_PRELOAD="$target/release/libpagewise_preload.so"
bash tools/guest/build.sh "$repo/lab/guest"

lab=pwdemo
src=(ip netns exec $lab-src) dst=(ip netns exec $lab-dst) store=(ip netns exec $lab-store)
work=$(mktemp -d /tmp/pagewise-demo.XXXXXX)
mkdir -p "$work/src" "$work/dst"
mem=/dev/shm/pagewise-demo-$$
incoming=/dev/shm/pagewise-demo-incoming-$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pkill -f "$incoming" 2>/dev/null || true
  bash tools/lab/twohost.sh down --prefix $lab || true
  rm -rf "$mem" "$incoming"-*
  echo "demo files kept in $work" >&2
}
trap cleanup EXIT

say "two hosts: $lab-src (10.77.0.1) and $lab-dst (10.77.0.2), link 240 Mbit/s; store 10.77.1.254"
bash tools/lab/twohost.sh up --prefix $lab --rate 240mbit

say "the VM's swap device on an NBD export of the store host (both hosts reach it)"
truncate -s $(( (ram_mib * 2 + 64) << 20 )) "$work/demo.shared"
"${store[@]}" qemu-nbd -f raw -x demo -b 10.77.1.254 -p 10809 --persistent --shared=4 \
  --discard=unmap "$work/demo.shared" 2>"$work/nbd.err" &
pids+=($!)
spec=nbd://10.77.1.254:10809/demo
for _ in $(seq 50); do
  "${src[@]}" "$pw" swapdev create "$spec" --size ${ram_mib}M --host-id src 2>/dev/null && break
  sleep 0.2
done
"${src[@]}" "$pw" swapdev inspect "$spec" | head -3

say "pagewise serve on both hosts (migration endpoints, one pre-shared key)"
head -c 32 /dev/urandom | base64 >"$work/psk"
serve() { # serve HOST IP EXTRA...
  local host=$1 ip=$2; shift 2
  local ns=(ip netns exec $lab-$host)
  "${ns[@]}" "$pw" serve --socket "$work/$host/pager.sock" --swapdev-dir "$work/$host" \
    --migrate-listen "$ip:7600" --psk-file "$work/psk" --migrate-dir "$incoming-$host" \
    --host-id "$host" "$@" >"$work/$host/serve.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do grep -q "listening on" "$work/$host/serve.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "listening on" "$work/$host/serve.log" || { cat "$work/$host/serve.log"; exit 1; }
  echo "$host: pagewise serve --socket $work/$host/pager.sock --migrate-listen $ip:7600 --psk-file $work/psk $*"
}
serve src 10.77.0.1 --vm "demo=$work/src/demo.sock:$spec"
serve dst 10.77.0.2

say "guest under pagewise vm run (memverify: $mib MiB, hot set $hot_mib MiB, ${seconds}s)"
qemu=(qemu-system-x86_64 -accel tcg -m ${ram_mib}M
  -object memory-backend-file,id=mem,size=${ram_mib}M,mem-path=$mem,share=on
  -machine q35,memory-backend=mem
  -kernel "$repo/lab/guest/vmlinuz" -initrd "$repo/lab/guest/initrd.gz"
  -append "console=ttyS0 quiet memverify.mib=$mib memverify.hot_mib=$hot_mib memverify.hot_rate_mibs=8 memverify.verify_secs=5 memverify.duration_secs=$seconds"
  -display none -serial "file:$work/serial.log" -no-reboot
  -qmp "unix:$work/src/demo.qmp,server=on,wait=off")
echo "src: pagewise vm run --socket $work/src/demo.sock --name demo -- ${qemu[*]}"
started=$(date +%s%N)
"${src[@]}" "$pw" vm run --socket "$work/src/demo.sock" --name demo -- "${qemu[@]}" 2>"$work/qemu.err" &
vm_pid=$!
pids+=($vm_pid)
serial=$work/serial.log

wait_serial() { # wait_serial PATTERN TIMEOUT_S  (on the guest console, wherever it runs)
  for _ in $(seq $(($2 * 5))); do
    grep -q "$1" "$serial" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo.sh: '$1' did not appear on the guest console $serial" >&2
  cat "$work/qemu.err" "$serial" >&2 2>/dev/null || true
  exit 1
}
wait_serial "memverify: filled" 120
boot_ms=$(( ($(date +%s%N) - started) / 1000000 ))
grep "memverify:" "$serial" | tail -3
wait_serial "memverify: pass 1 " 60
grep "memverify: pass 1 " "$serial"
rss_before=$(du -k "$mem" | cut -f1)
echo "guest RAM file resident: $((rss_before / 1024)) MiB"

say "pagewise stats (before eviction)"
"${src[@]}" "$pw" stats --socket "$work/src/pager.sock" --vm demo

evicted="(pagewise evict not available)"
if "$pw" evict --help >/dev/null 2>&1; then
  target_mib=$((hot_mib + 16))
  say "pagewise evict --vm demo --target-rss ${target_mib}M"
  "${src[@]}" "$pw" evict --socket "$work/src/pager.sock" --vm demo --target-rss "${target_mib}M" | tee "$work/evict.out"
  rss_after=$(du -k "$mem" | cut -f1)
  evicted="RAM file resident $((rss_before / 1024)) MiB -> $((rss_after / 1024)) MiB"
  echo "$evicted"
  passes_now=$(grep -c "memverify: pass" "$serial" || true)
  say "memverify keeps verifying (evicted pages fault back from the swap device)"
  wait_serial "memverify: pass $((passes_now + 1)) " 60
  grep "memverify: pass" "$serial" | tail -2
  say "pagewise stats (after eviction)"
  "${src[@]}" "$pw" stats --socket "$work/src/pager.sock" --vm demo
fi
"${src[@]}" "$pw" stats --socket "$work/src/pager.sock" --vm demo --json >"$work/stats.json"

say "agile live migration to $lab-dst: pagewise migrate --mode agile"
"${src[@]}" "$pw" migrate --socket "$work/src/pager.sock" --vm demo --to 10.77.0.2:7600 \
  --mode agile --json >"$work/migrate.json" || true
python3 - "$work/migrate.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
d = r.get("destination") or {}
ram = r["ram"]
print(f"status {r['status']}: total {r['total-time']} ms, downtime {r['downtime']} ms, "
      f"sent {ram['transferred'] / 1e6:.1f} MB of {ram['total'] / 1e6:.0f} MB RAM")
print(f"left in the shared swap device: {r['pages_stored']} pages; pushed after switchover: "
      f"{r['pages_pushed']}; demand faults on dst: {d.get('demand_faults')}")
print(f"the source held none of the VM RAM after {r['source_released_ms']} ms; dst QEMU pid {r['dest_qemu_pid']}")
if r.get("error"):
    print(f"error: {r['error']}")
PY
status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$work/migrate.json")
[ "$status" = completed ] || { echo "demo.sh: the migration ended $status" >&2; cat "$work/src/serve.log" "$work/dst/serve.log" >&2; exit 1; }
serial=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["dest_paths"][sys.argv[2]])' "$work/migrate.json" "$work/serial.log")
echo "the guest's console is now $serial (on $lab-dst)"
"${dst[@]}" "$pw" stats --socket "$work/dst/pager.sock" --vm demo

say "waiting for memverify to finish on $lab-dst"
wait_serial "memverify: DONE" $((seconds + 60))
done_line=$(grep "memverify: DONE" "$serial")
echo "$done_line"
wait "$vm_pid" || true

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
python3 - "$work/migrate.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"agile migration: {r['total-time']} ms, downtime {r['downtime']} ms, {r['ram']['transferred'] / 1e6:.1f} MB sent")
PY
echo "memverify: ${done_line#memverify: }"
case "$done_line" in *RESULT=PASS*) echo "RESULT: PASS" ;; *) echo "RESULT: FAIL"; exit 1 ;; esac
