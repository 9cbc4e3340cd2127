#!/usr/bin/env bash
# Part "concurrency" of npm run bench: what one host does for several VMs at once.
#
#   concurrency.sh --sock DAEMON_NBD_SOCKET --pid DAEMON_PID --work DIR [--runtime S]
#
# Needs a running daemon that creates volumes on first connect (auto_create_size_gb).
# Against a reference of nbdkit's file plugin over sparse local files, in the same run:
#   fsync       4 KiB random writes at QD1 with a FLUSH after each (fio --fsync=1): IOPS
#               and FLUSH p50/p99, on a fresh volume and on a written one, then 4 volumes
#               doing it at once (aggregate IOPS, FLUSH p50).
#   many        4 KiB random 70/30 at QD16: one volume alone, then 4 volumes each with
#               its own fio job at once (aggregate IOPS and the ratio to one).
#   isolation   4 KiB random reads at QD1 on one volume: p99 alone, and while another
#               volume takes 1 MiB sequential writes at QD8.
# "many" and "isolation" run on the reference too: its ratios are what this machine's
# cores give four fio jobs and a server written in C.
# Also the daemon's CPU seconds (all threads, and the event loop's thread) per part.
# Prints "concurrency KEY VALUE" lines on stdout for bench.sh's results.
set -euo pipefail
SOCK="" PID="" WORK="" RUNTIME=8
while [ $# -gt 0 ]; do
  case "$1" in
    --sock) SOCK=$2; shift 2;;
    --pid) PID=$2; shift 2;;
    --work) WORK=$2; shift 2;;
    --runtime) RUNTIME=$2; shift 2;;
    *) echo "concurrency.sh: unknown argument $1" >&2; exit 2;;
  esac
done
[ -n "$SOCK" ] && [ -n "$PID" ] && [ -n "$WORK" ] || { echo "concurrency.sh: --sock, --pid and --work are required" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UTIL="$HERE/util.mjs"
REFPID=""
cleanup() { [ -n "$REFPID" ] && kill "$REFPID" 2>/dev/null || true; rm -f "$WORK"/cref*.img; }
trap cleanup EXIT
for i in 0 1 2 3 4; do truncate -s 1G "$WORK/cref$i.img"; done
nbdkit --unix "$WORK/cref.sock" -P "$WORK/cref.pid" file dir="$WORK"
for _ in $(seq 50); do [ -s "$WORK/cref.pid" ] && break; sleep 0.1; done
REFPID=$(cat "$WORK/cref.pid")
ref() { echo "nbd+unix:///cref$1.img?socket=$WORK/cref.sock"; }
vol() { echo "nbd+unix:///conc-$1?socket=$SOCK"; }
emit() { echo "concurrency $1 $2"; }
ticks() { awk '{print $14 + $15}' "$1"; }
cpu_start() { C0=$(ticks "/proc/$PID/stat"); L0=$(ticks "/proc/$PID/task/$PID/stat"); }
cpu_end() { # KEY: CPU seconds since cpu_start, all threads and the event loop's
  local hz; hz=$(getconf CLK_TCK)
  emit "$1_cpu_s" "$(node "$UTIL" ratio $(( $(ticks "/proc/$PID/stat") - C0 )) "$hz" 0)"
  emit "$1_event_loop_cpu_s" "$(node "$UTIL" ratio $(( $(ticks "/proc/$PID/task/$PID/stat") - L0 )) "$hz" 0)"
}

# fio_jobs OUT ARGS... : one fio run, group reporting; prints "iops p50_us p99_us" where the
# percentiles are of FLUSH (sync) latency when the job fsyncs, else of completion latency.
fio_jobs() {
  local out=$1; shift
  fio --output-format=json --group_reporting --ioengine=nbd "$@" > "$out" 2> "$out.err" \
    || { echo "concurrency.sh: fio $* failed: $(tail -3 "$out.err")" >&2; exit 1; }
  python3 - "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
sync = j.get("sync", {}).get("lat_ns", {}).get("percentile")
side = j["read"] if j["read"]["iops"] > 0 and j["write"]["iops"] == 0 else j["write"]
pct = sync if sync else side.get("clat_ns", {}).get("percentile", {})
print(f'{iops:.0f} {pct.get("50.000000", 0) / 1000:.1f} {pct.get("99.000000", 0) / 1000:.1f}')
PY
}
prefill() { fio --ioengine=nbd --name=prefill --uri="$1" --rw=write --bs=1M --iodepth=8 --size=256M > /dev/null 2>&1; }
timed=(--time_based --runtime="$RUNTIME" --size=256M)

# ---- fsync: a database's commit ----------------------------------------------------
fsync_args=(--rw=randwrite --bs=4k --iodepth=1 --fsync=1 "${timed[@]}")
for state in fresh written; do
  if [ "$state" = written ]; then prefill "$(ref 0)"; prefill "$(vol fs0)"; sync; fi
  read -r ri rp50 rp99 <<< "$(fio_jobs "$WORK/c.json" --name=r --uri="$(ref 0)" "${fsync_args[@]}")"; sync
  cpu_start
  read -r ci cp50 cp99 <<< "$(fio_jobs "$WORK/c.json" --name=c --uri="$(vol fs0)" "${fsync_args[@]}")"; sync
  cpu_end "fsync_$state"
  [ "$state" = fresh ] && { rm -f "$WORK/cref0.img"; truncate -s 1G "$WORK/cref0.img"; }
  emit "fsync_${state}_iops" "$ci"; emit "fsync_${state}_flush_p50_us" "$cp50"; emit "fsync_${state}_flush_p99_us" "$cp99"
  emit "fsync_${state}_reference_iops" "$ri"; emit "fsync_${state}_reference_flush_p50_us" "$rp50"; emit "fsync_${state}_reference_flush_p99_us" "$rp99"
  emit "fsync_${state}_ratio" "$(node "$UTIL" ratio "$ci" "$ri")"
  echo "concurrency: fsync ($state) $ci IOPS, FLUSH p50 ${cp50}us; reference $ri IOPS, ${rp50}us" >&2
done
refs=() vols=()
for i in 1 2 3 4; do prefill "$(ref "$i")"; prefill "$(vol "fs$i")"; refs+=(--name="r$i" --uri="$(ref "$i")"); vols+=(--name="c$i" --uri="$(vol "fs$i")"); done
sync
read -r ri rp50 _ <<< "$(fio_jobs "$WORK/c.json" "${fsync_args[@]}" "${refs[@]}")"; sync
cpu_start
read -r ci cp50 _ <<< "$(fio_jobs "$WORK/c.json" "${fsync_args[@]}" "${vols[@]}")"; sync
cpu_end fsync_4
emit fsync_4_iops "$ci"; emit fsync_4_flush_p50_us "$cp50"; emit fsync_4_reference_iops "$ri"; emit fsync_4_reference_flush_p50_us "$rp50"
emit fsync_4_ratio "$(node "$UTIL" ratio "$ci" "$ri")"
echo "concurrency: fsync x4 $ci IOPS, FLUSH p50 ${cp50}us; reference $ri IOPS, ${rp50}us" >&2

# ---- many: four VMs at once ---------------------------------------------------------
mix=(--rw=randrw --rwmixread=70 --bs=4k --iodepth=16 "${timed[@]}")
for i in 1 2 3 4; do prefill "$(vol "m$i")"; done
sync
cpu_start
read -r one _ <<< "$(fio_jobs "$WORK/c.json" --name=m1 --uri="$(vol m1)" "${mix[@]}")"
cpu_end many_1
jobs=()
for i in 1 2 3 4; do jobs+=(--name="m$i" --uri="$(vol "m$i")"); done
cpu_start
read -r four _ <<< "$(fio_jobs "$WORK/c.json" "${mix[@]}" "${jobs[@]}")"
cpu_end many_4
emit many_1_iops "$one"; emit many_4_iops "$four"; emit many_ratio "$(node "$UTIL" ratio "$four" "$one")"
echo "concurrency: randrw 70/30 QD16, one volume $one IOPS, four at once $four IOPS" >&2
# The same on the reference: what four fio jobs and their server get from this machine's cores.
read -r rone _ <<< "$(fio_jobs "$WORK/c.json" --name=r1 --uri="$(ref 1)" "${mix[@]}")"
jobs=()
for i in 1 2 3 4; do jobs+=(--name="r$i" --uri="$(ref "$i")"); done
read -r rfour _ <<< "$(fio_jobs "$WORK/c.json" "${mix[@]}" "${jobs[@]}")"
emit many_1_reference_iops "$rone"; emit many_4_reference_iops "$rfour"; emit many_reference_ratio "$(node "$UTIL" ratio "$rfour" "$rone")"
echo "concurrency: reference randrw 70/30 QD16, one file $rone IOPS, four at once $rfour IOPS" >&2

# ---- isolation: a streaming neighbour ----------------------------------------------
# isolation READ_URI WRITE_URI: "p99_alone p99_beside" of 4 KiB random reads at QD1, alone
# and while the other export takes 1 MiB sequential writes at QD8.
isolation() {
  local reads=(--name=iso-r --uri="$1" --rw=randread --bs=4k --iodepth=1 "${timed[@]}") alone busy writer
  prefill "$1"; sync
  read -r _ _ alone <<< "$(fio_jobs "$WORK/c.json" "${reads[@]}")"
  fio --ioengine=nbd --name=iso-w --uri="$2" --rw=write --bs=1M --iodepth=8 --size=1G --time_based --runtime=$((RUNTIME + 4)) > "$WORK/iso-w.txt" 2>&1 &
  writer=$!
  sleep 2
  read -r _ _ busy <<< "$(fio_jobs "$WORK/c.json" "${reads[@]}")"
  wait "$writer" || { echo "concurrency.sh: the streaming writer on $2 failed: $(tail -3 "$WORK/iso-w.txt")" >&2; return 1; }
  echo "$alone $busy"
}
read -r alone99 busy99 <<< "$(isolation "$(vol iso-r)" "$(vol iso-w)")"
[ -n "$busy99" ] || exit 1
emit isolation_read_p99_alone_us "$alone99"; emit isolation_read_p99_beside_writer_us "$busy99"
emit isolation_ratio "$(node "$UTIL" ratio "$busy99" "$alone99" 0.001)"
echo "concurrency: 4 KiB random read p99 ${alone99}us alone, ${busy99}us beside a 1 MiB QD8 writer" >&2
# The same on the reference (nbdkit serves both files).
read -r ralone99 rbusy99 <<< "$(isolation "$(ref 0)" "$(ref 4)")"
[ -n "$rbusy99" ] || exit 1
emit isolation_reference_read_p99_alone_us "$ralone99"; emit isolation_reference_read_p99_beside_writer_us "$rbusy99"
emit isolation_reference_ratio "$(node "$UTIL" ratio "$rbusy99" "$ralone99" 0.001)"
echo "concurrency: reference 4 KiB random read p99 ${ralone99}us alone, ${rbusy99}us beside a 1 MiB QD8 writer" >&2
