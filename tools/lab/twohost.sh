#!/usr/bin/env bash
# The two-host lab: two hosts (network namespaces) joined by a tc-shaped migration link, and a
# third place for shared storage (an NBD or NFS server) that both hosts reach unshaped.
#
#   PREFIX-src  10.77.0.1 --(veth, tbf rate + netem delay, both directions)-- 10.77.0.2  PREFIX-dst
#       |  10.77.1.1                                                         10.77.1.2  |
#       +------------------------ PREFIX-store: bridge 10.77.1.254 ---------------------+
#
# Usage:
#   twohost.sh up   [--prefix P] [--rate RATE] [--delay DELAY]   e.g. --rate 240mbit --delay 1ms
#   twohost.sh down [--prefix P]
#   twohost.sh status [--prefix P]
# Run a command on a host: ip netns exec P-src CMD ... (the store: P-store).
# Everything lives inside namespaces this script made; `down` removes all of it (also after a
# half-finished `up`). RATE and DELAY go to tc as they are (tbf rate, netem delay). The
# machines here have no netem qdisc: there, only --delay 0ms (the default) works.
set -euo pipefail

cmd=${1:-}
shift || true
prefix=pw rate=1gbit delay=0ms
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    *) echo "twohost.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$prefix" in
  *[!a-zA-Z0-9_-]*|"") echo "twohost.sh: --prefix must be letters, digits, - or _" >&2; exit 2 ;;
esac
[ ${#prefix} -le 8 ] || { echo "twohost.sh: --prefix is at most 8 characters (interface names)" >&2; exit 2; }
src=$prefix-src dst=$prefix-dst store=$prefix-store

down() {
  for ns in "$src" "$dst" "$store"; do
    ip netns del "$ns" 2>/dev/null || true
  done
}

shape() { # namespace device
  if [ "$delay" = 0ms ] || [ "$delay" = 0 ]; then
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 256kbit latency 50ms
    return
  fi
  if ! ip netns exec "$1" tc qdisc add dev "$2" root handle 1: netem delay "$delay" 2>/dev/null; then
    echo "twohost.sh: this kernel has no netem qdisc (sch_netem): --delay $delay cannot be set; use --delay 0ms" >&2
    return 1
  fi
  ip netns exec "$1" tc qdisc add dev "$2" parent 1:1 handle 10: tbf rate "$rate" burst 256kbit latency 50ms
}

up() {
  down
  # A failed step anywhere below removes what was made.
  trap 'down' EXIT
  for ns in "$src" "$dst" "$store"; do
    ip netns add "$ns"
    ip netns exec "$ns" ip link set lo up
  done
  # The migration link.
  ip link add "$prefix-m0" netns "$src" type veth peer name "$prefix-m1" netns "$dst"
  ip netns exec "$src" ip addr add 10.77.0.1/24 dev "$prefix-m0"
  ip netns exec "$dst" ip addr add 10.77.0.2/24 dev "$prefix-m1"
  ip netns exec "$src" ip link set "$prefix-m0" up
  ip netns exec "$dst" ip link set "$prefix-m1" up
  shape "$src" "$prefix-m0"
  shape "$dst" "$prefix-m1"
  # The storage network: a bridge in the store namespace, one leg per host.
  ip netns exec "$store" ip link add br0 type bridge
  ip netns exec "$store" ip addr add 10.77.1.254/24 dev br0
  ip netns exec "$store" ip link set br0 up
  local i=1
  for ns in "$src" "$dst"; do
    ip link add "$prefix-s$i" netns "$ns" type veth peer name "$prefix-b$i" netns "$store"
    ip netns exec "$ns" ip addr add "10.77.1.$i/24" dev "$prefix-s$i"
    ip netns exec "$ns" ip link set "$prefix-s$i" up
    ip netns exec "$store" ip link set "$prefix-b$i" master br0
    ip netns exec "$store" ip link set "$prefix-b$i" up
    i=$((i + 1))
  done
  trap - EXIT
  echo "two-host lab up: $src 10.77.0.1 <-> $dst 10.77.0.2 (rate $rate, delay $delay); store $store 10.77.1.254"
}

status() {
  for ns in "$src" "$dst" "$store"; do
    ip netns list | grep -qw "$ns" && echo "$ns: present" || echo "$ns: absent"
  done
  ip netns exec "$src" tc qdisc show dev "$prefix-m0" 2>/dev/null || true
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: twohost.sh up|down|status [--prefix P] [--rate RATE] [--delay DELAY]" >&2; exit 2 ;;
esac
