#!/usr/bin/env bash
# nbd-compare: measure an NBD export with fio's nbd engine, side by side with a
# reference server (nbdkit's file plugin over a local sparse file, i.e. plain local
# disk behind the same protocol), in one run, and print ratios.
# (The team's shared/bench/nbd-compare, with node instead of python3 for the arithmetic.)
#
#   nbd-compare.sh --uri 'nbd+unix:///vol?socket=/path/nbd.sock' [--size 1G] [--runtime 8]
#               [--workloads randread,randwrite,randrw,seqwrite,seqread,lat] [--rounds 3]
#               [--json FILE] [--workdir DIR] [--reference URI]
#
# --reference measures another export as the reference instead of nbdkit's file plugin
# (the bench's tls part compares an export over TLS against the same export in plaintext).
#
# The candidate export must be at least --size bytes. It is prefilled (sequential 1M
# writes over the first --size bytes) before the read workloads, exactly like the
# reference. Each workload runs --rounds times (default 3) as reference, candidate,
# reference, candidate, ... with the page cache written back between runs; each side's
# figure is the median of its rounds, so a noisy moment on this shared machine moves
# one round, not the result.
# Output: a table on stderr, then one line per workload on stdout:
#   <workload> candidate=<iops> reference=<iops> ratio=<candidate/reference>
# and for 'lat': p50/p99 completion latency of QD1 4k random writes in microseconds
# (ratio = reference p50 / candidate p50, so above 1 means the candidate is faster).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UTIL="$HERE/util.mjs"
URI="" SIZE="1G" RUNTIME=8 ROUNDS=3 WORKLOADS="randread,randwrite,randrw,seqwrite,seqread,lat" JSON="" WORKDIR="" REF=""
while [ $# -gt 0 ]; do
  case "$1" in
    --uri) URI="$2"; shift 2;;
    --size) SIZE="$2"; shift 2;;
    --runtime) RUNTIME="$2"; shift 2;;
    --rounds) ROUNDS="$2"; shift 2;;
    --workloads) WORKLOADS="$2"; shift 2;;
    --json) JSON="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --reference) REF="$2"; shift 2;;
    -h|--help) sed -n 2,24p "$0"; exit 0;;
    *) echo "nbd-compare: unknown argument $1" >&2; exit 2;;
  esac
done
[ -n "$URI" ] || { echo "nbd-compare: --uri is required" >&2; exit 2; }
need() { command -v "$1" >/dev/null 2>&1; }
if ! need fio || ! need nbdkit || ! fio --enghelp 2>/dev/null | grep -qx $'\tnbd'; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio nbdkit libnbd-bin) >/dev/null 2>&1 || true
  fi
fi
need fio && need nbdkit || { echo "nbd-compare: needs fio (with the nbd engine) and nbdkit" >&2; exit 2; }

WORK=$(mktemp -d "${WORKDIR:-/tmp}/nbd-compare.XXXXXX")
REFPID=""
cleanup() { if [ -n "$REFPID" ]; then kill "$REFPID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [ -z "$REF" ]; then
  truncate -s "$SIZE" "$WORK/ref.img"
  nbdkit --unix "$WORK/ref.sock" -P "$WORK/ref.pid" file "$WORK/ref.img"
  for _ in $(seq 50); do [ -s "$WORK/ref.pid" ] && break; sleep 0.1; done
  REFPID=$(cat "$WORK/ref.pid")
  REF="nbd+unix:///?socket=$WORK/ref.sock"
fi

# fio_run URI NAME ARGS... -> prints "iops p50us p99us"
fio_run() {
  local uri="$1" name="$2"; shift 2
  fio --name="$name" --ioengine=nbd --uri="$uri" --size="$SIZE" --output-format=json "$@" \
    > "$WORK/out.json" 2> "$WORK/err.txt" || { echo "nbd-compare: fio failed on $uri: $(tail -3 "$WORK/err.txt")" >&2; echo "0 0 0"; return; }
  node "$UTIL" fio-summary "$WORK/out.json"
}
prefill() { fio_run "$1" prefill --rw=write --bs=1M --iodepth=8 >/dev/null; }

declare -A ARGS=(
  [randread]="--rw=randread --bs=4k --iodepth=32 --time_based --runtime=$RUNTIME"
  [randwrite]="--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=$RUNTIME"
  [randrw]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --time_based --runtime=$RUNTIME"
  [seqwrite]="--rw=write --bs=1M --iodepth=8 --time_based --runtime=$RUNTIME"
  [seqread]="--rw=read --bs=1M --iodepth=8 --time_based --runtime=$RUNTIME"
  [lat]="--rw=randwrite --bs=4k --iodepth=1 --time_based --runtime=$RUNTIME"
)
for w in ${WORKLOADS//,/ }; do
  [ -n "${ARGS[$w]:-}" ] || { echo "nbd-compare: unknown workload $w (known: ${!ARGS[*]})" >&2; exit 2; }
done
prefill "$REF"; [ "$URI" = "$REF" ] || prefill "$URI"; sync; sleep 1
median() { node "$UTIL" median "$@"; }
RESULTS=()
printf '%-10s %12s %12s %8s\n' workload candidate reference ratio >&2
for w in ${WORKLOADS//,/ }; do
  ri=() rp50=() rp99=() ci=() cp50=() cp99=()
  for _ in $(seq "$ROUNDS"); do
    read -r a b c < <(fio_run "$REF" "$w" ${ARGS[$w]}); ri+=("$a"); rp50+=("$b"); rp99+=("$c"); sync
    read -r a b c < <(fio_run "$URI" "$w" ${ARGS[$w]}); ci+=("$a"); cp50+=("$b"); cp99+=("$c"); sync
  done
  if [ "$w" = lat ]; then
    r50=$(median "${rp50[@]}"); r99=$(median "${rp99[@]}"); c50=$(median "${cp50[@]}"); c99=$(median "${cp99[@]}")
    ratio=$(node "$UTIL" ratio "$r50" "$c50" 1e-9)
    printf '%-10s %9sus p50 %9sus p50 %8s  (p99 %sus vs %sus)\n' "$w" "$c50" "$r50" "$ratio" "$c99" "$r99" >&2
    line="lat candidate_p50_us=$c50 candidate_p99_us=$c99 reference_p50_us=$r50 reference_p99_us=$r99 ratio=$ratio"
  else
    c=$(median "${ci[@]}"); r=$(median "${ri[@]}")
    ratio=$(node "$UTIL" ratio "$c" "$r" 1)
    printf '%-10s %12.0f %12.0f %8s\n' "$w" "$c" "$r" "$ratio" >&2
    line="$w candidate=$c reference=$r ratio=$ratio"
  fi
  echo "$line"; RESULTS+=("$line")
done
if [ -n "$JSON" ]; then
  printf '%s\n' "${RESULTS[@]}" | node "$UTIL" lines-to-json "$JSON"
fi
