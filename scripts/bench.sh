#!/usr/bin/env bash
# npm run bench: measure the built daemon (dist/) on this machine, from the repo alone.
#
#   1. compare  nbd-compare (scripts/bench/nbd-compare.sh): fio's nbd engine against a
#               fresh volume and against a reference (nbdkit file plugin over a sparse
#               local file): randread, randwrite, randrw 70/30, seqwrite, seqread, lat;
#               then the daemon's RSS (now and peak).
#   2. memory   BENCH_MEM_VOLUMES (100) volumes of 1 GiB, 64 MiB written into each (fio,
#               sequential 1 MiB writes, a few volumes at a time); the daemon's VmRSS with
#               them all open and dirty, again once everything is sealed ([volumes]
#               seal_idle_ms = 2000), then the restart time with that many volumes.
#   3. flush    1 GiB of random 4 KiB writes (fio, QD32, no fsync), then one NBD FLUSH
#               timed by scripts/bench/flush-latency.mjs; the same on the reference.
#   3b. concurrency  scripts/bench/concurrency.sh: FLUSH after every 4 KiB write (fio --fsync=1)
#               on one volume and on four at once, four VMs' random 70/30 I/O against one's,
#               and one volume's read p99 beside a neighbour streaming 1 MiB writes; with the
#               daemon's CPU seconds (all threads, and the event loop's), against nbdkit file.
#   3c. tls     one daemon with tls = "on" on a TCP address and a self-signed certificate
#               made here by openssl: nbd-compare of the same volume over nbds:// (candidate) against
#               plaintext nbd:// (reference), random 4 KiB reads and writes at QD32 and 1 MiB
#               sequential reads and writes at QD8.
#   4. store    scripts/bench/store.mjs against MinIO on loopback: drain throughput of
#               1 GiB (unsealed, and sealed beforehand), store requests per GiB, cold
#               sequential read of a woken volume with 20 ms injected store latency, with
#               and without read-ahead (needs the binary scripts/setup-minio.sh builds);
#               fork latency vs written size (clean, and with 1 MiB dirty) and
#               wake-on-another-host time to first byte.
#   4b. durable scripts/bench/durable.mjs against MinIO on loopback: a durable volume's FLUSH
#               p50/p99 with 20 ms injected store latency next to one 4 KiB PUT's in the same
#               run; fio 4 KiB random writes QD1 --fsync=1 (durable), QD32 --fsync=32 (durable
#               and demand); store requests per GiB written and FLUSHes per log PUT.
#   5. vm       scripts/bench/vm.mjs: boot time of the test microVM (qemu TCG) from a fork
#               on a cold host, without and with the boot hot set recorded through
#               `updraft bless --boot-record` (needs qemu-system-x86, linux-image-amd64,
#               busybox-static; skipped without them).
#               BENCH_STORE_ENCRYPTED=1 runs it on an encrypted store (encryption on vs off).
#   6. gc       scripts/bench/gc.mjs: reconciliation time per 1,000 manifests (file:// and
#               MinIO), deletion throughput, refcount update latency on SQLite and
#               PostgreSQL (needs MinIO and Debian's postgresql package).
# Each part runs its own daemon (`node dist/src/cli/updraft.cjs run -c updraft.toml`) in a
# folder of one scratch directory, so one part's background sealing cannot disturb
# another. Everything started here is stopped by its pid; the scratch dir is removed.
#
# Environment:
#   BENCH_RUNTIME (8)  seconds per fio run in compare     BENCH_ROUNDS (3)  rounds per workload
#   BENCH_SIZE (1G)    bytes each compare run covers      BENCH_WORKLOADS   comma list (all six)
#   BENCH_PARTS (compare,memory,flush,concurrency,tls,store,durable,vm,gc)  BENCH_DURABLE_FLUSHES (200)  BENCH_VM_ROUNDS (2)  BENCH_JSON results file
#   BENCH_GC_MANIFESTS (1000)  BENCH_GC_PACKS (500)
#   BENCH_STORE_SIZE_MIB (1024)  BENCH_STORE_LATENCY_MS (20)  BENCH_READ_AHEAD_PACKS (8)
#   BENCH_STORE_ENCRYPTED (0)  BENCH_STORE_PARTS (drain,migrate,cold,fork)
#   BENCH_MEM_VOLUMES (100)  BENCH_MEM_WRITE (64M)  BENCH_MEM_PARALLEL (4)  BENCH_FLUSH_SIZE (1G)
# Results: a table at the end, and JSON in BENCH_JSON (default bench-results.json in the
# scratch dir), copied to ./bench-results.json.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE="$ROOT/scripts/bench"
UTIL="$HERE/util.mjs"
MAIN="$ROOT/dist/src/cli/updraft.cjs"

RUNTIME=${BENCH_RUNTIME:-8}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-1G}
WORKLOADS=${BENCH_WORKLOADS:-randread,randwrite,randrw,seqwrite,seqread,lat}
PARTS=${BENCH_PARTS:-compare,memory,flush,concurrency,tls,store,durable,vm,gc}
MEM_VOLUMES=${BENCH_MEM_VOLUMES:-100}
MEM_WRITE=${BENCH_MEM_WRITE:-64M}
MEM_PARALLEL=${BENCH_MEM_PARALLEL:-4}
FLUSH_SIZE=${BENCH_FLUSH_SIZE:-1G}

say() { printf '\n== %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }
need() { command -v "$1" >/dev/null 2>&1; }

# ---- tools ------------------------------------------------------------------------
if ! need fio || ! need nbdkit || ! need nbdinfo || ! fio --enghelp 2>/dev/null | grep -qx $'\tnbd'; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    echo "bench: installing fio nbdkit libnbd-bin" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio nbdkit libnbd-bin) >/dev/null 2>&1 || true
  fi
fi
need fio && need nbdkit && fio --enghelp 2>/dev/null | grep -qx $'\tnbd' \
  || die "needs fio (with the nbd engine) and nbdkit: apt-get install fio nbdkit libnbd-bin"
[ -f "$MAIN" ] || die "$MAIN is missing: build first (npm run bench does)"
# The daemon's Node.js flags: the `updraft` command's, or BENCH_DAEMON_FLAGS when set ("" for none).
DAEMON_FLAGS=${BENCH_DAEMON_FLAGS-$(node -e 'import(process.argv[1]).then((m) => console.log(m.DAEMON_NODE_FLAGS.join(" ")))' "$ROOT/dist/src/cli/node-flags.js")}

# ---- scratch, daemons, cleanup ----------------------------------------------------
SCRATCH=$(mktemp -d /tmp/updraft-bench.XXXXXX)
JSON_OUT=${BENCH_JSON:-$SCRATCH/bench-results.json}
LINES="$SCRATCH/results.txt"   # "section key value" lines, assembled into JSON at the end
: > "$LINES"
record() { echo "$1 $2 $3" >> "$LINES"; }
STARTED_AT=$(date +%s)
DAEMON_PIDS=()   # every daemon pid we started (stopped ones too; stopping twice is harmless)
NBDKIT_PIDS=()

alive() { # a pid that still runs (a zombie does not count)
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)
  [ "$state" != Z ]
}
stop_pid() { # PID [GRACE_S]: SIGTERM, wait, SIGKILL after the grace period
  local pid=$1 grace=${2:-30} i
  alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 20; i++)); do alive "$pid" || break; sleep 0.05; done
  if alive "$pid"; then
    echo "bench: pid $pid ignored SIGTERM for ${grace}s; SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local status=$? pid
  trap - EXIT INT TERM
  if [ -n "${CHILD:-}" ]; then stop_pid "$CHILD" 30; fi
  for pid in "${DAEMON_PIDS[@]}" "${NBDKIT_PIDS[@]}"; do stop_pid "$pid" 15; done
  if [ "$status" != 0 ] && [ -n "${LAST_LOG:-}" ] && [ -f "$LAST_LOG" ]; then
    echo "bench: failed; last lines of the daemon log $LAST_LOG:" >&2
    tail -n 20 "$LAST_LOG" | sed 's/^/  /' >&2
  fi
  rm -rf "$SCRATCH"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# new_daemon NAME [EXTRA_TOML] [EXTRA_NBD_TOML]: write $SCRATCH/NAME/updraft.toml; sets D_DIR D_URL D_SOCK
new_daemon() {
  local name=$1 extra=${2:-} extra_nbd=${3:-} port
  D_DIR="$SCRATCH/$name"
  mkdir -p "$D_DIR"
  port=$(node "$UTIL" free-port)
  D_URL="http://127.0.0.1:$port"
  D_SOCK="$D_DIR/nbd.sock"
  cat > "$D_DIR/updraft.toml" <<TOML
[cache]
dir = "$D_DIR/cache"

[storage]
url = "file://$D_DIR/store"

[servers.nbd]
unix_socket = "$D_SOCK"
auto_create_size_gb = 2
$extra_nbd

[servers.http]
address = "127.0.0.1:$port"
$extra
TOML
}
# start_daemon: start the daemon of D_DIR; sets D_PID and D_READY_MS (spawn -> /healthz 200)
start_daemon() {
  local t0 t1
  LAST_LOG="$D_DIR/daemon.log"
  t0=$(date +%s%N)
  # shellcheck disable=SC2086 # DAEMON_FLAGS is a list of flags
  node $DAEMON_FLAGS "$MAIN" run -c "$D_DIR/updraft.toml" >> "$D_DIR/daemon.log" 2>&1 &
  D_PID=$!
  DAEMON_PIDS+=("$D_PID")
  t1=$(node "$UTIL" wait-healthy "$D_URL" "$D_PID" 60000) || die "daemon in $D_DIR did not become healthy"
  D_READY_MS=$(node -e 'console.log((Number(BigInt(process.argv[2]) - BigInt(process.argv[1])) / 1e6).toFixed(1))' "$t0" "$t1")
  echo "bench: daemon pid $D_PID ready in ${D_READY_MS} ms ($D_DIR)" >&2
}
stop_daemon() { stop_pid "$D_PID" 60; }
rss_mib() { # PID [FIELD]: VmRSS (or FIELD, e.g. VmHWM) in MiB
  local k v rest
  while read -r k v rest; do
    if [ "$k" = "${2:-VmRSS}:" ]; then node "$UTIL" ratio "$v" 1024 0; return; fi
  done < "/proc/$1/status"
  echo null
}
# run_child OUT CMD...: run CMD in the background with stdout to OUT (stderr passes
# through) and wait for it, so that a signal to this script is handled at once and the
# cleanup can stop the child by its pid.
CHILD=""
run_child() {
  local outfile=$1 rc=0; shift
  "$@" > "$outfile" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
# fio_json FILE ARGS...: run fio with JSON output into FILE, fail loudly
fio_json() {
  local outfile=$1
  shift
  run_child "$outfile" fio --output-format=json "$@" 2> "$outfile.err" \
    || die "fio $* failed: $(tail -3 "$outfile.err")"
}

record config runtime_s "$RUNTIME"
record config rounds "$ROUNDS"
record config size "$SIZE"
record config workloads "$WORKLOADS"
record config parts "$PARTS"
record config node "$(node --version)"
record config fio "$(fio --version)"
record config nbdkit "$(nbdkit --version | head -1 | tr ' ' '-')"
record config commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
record config cpus "$(nproc)"
record run loadavg_start "$(cut -d" " -f1-3 /proc/loadavg | tr " " /)"

# ---- 1. compare -------------------------------------------------------------------
if has_part compare; then
  say "compare: fio vs nbdkit file plugin, ${RUNTIME}s x $ROUNDS rounds, size $SIZE ($WORKLOADS)"
  new_daemon compare
  start_daemon
  run_child /dev/null bash "$HERE/nbd-compare.sh" --uri "nbd+unix:///bench?socket=$D_SOCK" --size "$SIZE" \
    --runtime "$RUNTIME" --rounds "$ROUNDS" --workloads "$WORKLOADS" --json "$SCRATCH/compare.json" --workdir "$SCRATCH" \
    || die "nbd-compare failed"
  record compare rss_after_mib "$(rss_mib "$D_PID")"
  record compare rss_peak_mib "$(rss_mib "$D_PID" VmHWM)"
  echo "bench: compare: daemon RSS after $(rss_mib "$D_PID") MiB (peak $(rss_mib "$D_PID" VmHWM) MiB)" >&2
  stop_daemon
  rm -rf "$D_DIR"
fi

# ---- 2. memory and restart with many volumes ----------------------------------------
if has_part memory; then
  say "memory: $MEM_VOLUMES volumes x 1 GiB, $MEM_WRITE written in each, $MEM_PARALLEL at a time"
  new_daemon memory $'\n[volumes]\nseal_idle_ms = 2000'
  start_daemon
  node "$UTIL" create-volumes "$D_URL" vol- "$MEM_VOLUMES" 1
  record memory volumes "$MEM_VOLUMES"
  record memory volume_size_gib 1
  record memory written_mib_per_volume "$(numfmt --from=iec --to-unit=1048576 "$MEM_WRITE" 2>/dev/null || echo "$MEM_WRITE")"
  record memory rss_idle_mib "$(rss_mib "$D_PID")"
  w0=$(date +%s%N)
  for ((i = 1; i <= MEM_VOLUMES; i += MEM_PARALLEL)); do
    jobs=()
    for ((j = i; j < i + MEM_PARALLEL && j <= MEM_VOLUMES; j++)); do
      jobs+=(--name="vol-$(printf %03d "$j")" --uri="nbd+unix:///vol-$(printf %03d "$j")?socket=$D_SOCK")
    done
    fio_json "$SCRATCH/fill.json" --ioengine=nbd --rw=write --bs=1M --iodepth=8 --size="$MEM_WRITE" "${jobs[@]}"
  done
  w1=$(date +%s%N)
  record memory write_seconds "$(node "$UTIL" ratio $((w1 - w0)) 1e9 0)"
  record memory rss_dirty_mib "$(rss_mib "$D_PID")"
  dirty=$(node "$UTIL" dirty-bytes "$D_URL")
  record memory dirty_mib_at_rss "$(node "$UTIL" ratio "$dirty" 1048576 0)"
  echo "bench: written in $(node "$UTIL" ratio $((w1 - w0)) 1e9 0)s; RSS $(rss_mib "$D_PID") MiB; $dirty bytes still dirty" >&2
  run_child "$SCRATCH/seal-wait.txt" node "$UTIL" wait-sealed "$D_URL" 600000 || die "sealing did not finish"
  seal_wait=$(cat "$SCRATCH/seal-wait.txt")
  sleep 3 # the commit that follows a seal, then a quiet moment
  record memory seal_wait_s "$seal_wait"
  record memory rss_sealed_mib "$(rss_mib "$D_PID")"
  record memory rss_peak_mib "$(rss_mib "$D_PID" VmHWM)"
  record memory cache_blocks "$(node "$UTIL" metric "$D_URL" updraft_cache_blocks)"
  record memory cache_memory_mib "$(node "$UTIL" ratio "$(node "$UTIL" metric "$D_URL" updraft_cache_memory_bytes)" 1048576 0)"
  record memory dedup_hits "$(node "$UTIL" metric "$D_URL" updraft_cache_dedup_hits_total)"
  echo "bench: sealed after ${seal_wait}s; RSS $(rss_mib "$D_PID") MiB (peak $(rss_mib "$D_PID" VmHWM) MiB)" >&2
  s0=$(date +%s%N)
  stop_daemon
  s1=$(date +%s%N)
  record memory stop_ms "$(node "$UTIL" ratio $((s1 - s0)) 1e6 0)"
  start_daemon
  record memory restart_healthz_ms "$D_READY_MS"
  record memory restart_host_ready_ms "$(node "$UTIL" host-ready-ms "$D_DIR/daemon.log")"
  record memory restart_volumes "$(node -e 'fetch(process.argv[1] + "/healthz").then((r) => r.json()).then((j) => console.log(j.volumes))' "$D_URL")"
  record memory rss_after_restart_mib "$(rss_mib "$D_PID")"
  stop_daemon
  rm -rf "$D_DIR"
fi

# ---- 3. FLUSH after a burst of random writes ----------------------------------------
if has_part flush; then
  say "flush: $FLUSH_SIZE of random 4 KiB writes at QD32, then one NBD FLUSH (updraft and reference)"
  record flush written_gib "$(node "$UTIL" ratio "$(numfmt --from=iec "$FLUSH_SIZE")" 1073741824 0)"
  fill_args=(--name=burst --ioengine=nbd --rw=randwrite --bs=4k --iodepth=32 --size="$FLUSH_SIZE")
  # Reference: nbdkit file plugin over a sparse file, its FLUSH is an fdatasync of the file.
  truncate -s "$FLUSH_SIZE" "$SCRATCH/ref.img"
  nbdkit --unix "$SCRATCH/ref.sock" -P "$SCRATCH/ref.pid" file "$SCRATCH/ref.img"
  for _ in $(seq 50); do [ -s "$SCRATCH/ref.pid" ] && break; sleep 0.1; done
  NBDKIT_PIDS+=("$(cat "$SCRATCH/ref.pid")")
  sync
  fio_json "$SCRATCH/burst-ref.json" "${fill_args[@]}" --uri="nbd+unix:///?socket=$SCRATCH/ref.sock"
  out=$(node "$HERE/flush-latency.mjs" "nbd+unix:///?socket=$SCRATCH/ref.sock" --count 2) || die "FLUSH on the reference failed"
  read -r ref_flush ref_flush2 <<< "$out"
  read -r ref_iops _ <<< "$(node "$UTIL" fio-summary "$SCRATCH/burst-ref.json")"
  stop_pid "${NBDKIT_PIDS[-1]}"
  rm -f "$SCRATCH/ref.img"
  sync
  new_daemon flush
  start_daemon
  fio_json "$SCRATCH/burst.json" "${fill_args[@]}" --uri="nbd+unix:///burst?socket=$D_SOCK"
  out=$(node "$HERE/flush-latency.mjs" "nbd+unix:///burst?socket=$D_SOCK" --count 2) || die "FLUSH on updraft failed"
  read -r flush flush2 <<< "$out"
  read -r iops _ <<< "$(node "$UTIL" fio-summary "$SCRATCH/burst.json")"
  echo "bench: FLUSH $flush ms after $iops IOPS (reference $ref_flush ms after $ref_iops IOPS)" >&2
  record flush candidate_write_iops "$iops"
  record flush candidate_flush_ms "$flush"
  record flush candidate_second_flush_ms "$flush2"
  record flush reference_write_iops "$ref_iops"
  record flush reference_flush_ms "$ref_flush"
  record flush reference_second_flush_ms "$ref_flush2"
  stop_daemon
  rm -rf "$D_DIR"
fi

# ---- 3b. several VMs at once: FLUSH-heavy, mixed, and a streaming neighbour -----------
if has_part concurrency; then
  say "concurrency: fio --fsync=1 on 1 and 4 volumes, 4 volumes of random 70/30, read p99 beside a streaming writer"
  new_daemon concurrency
  start_daemon
  run_child "$SCRATCH/concurrency.lines" bash "$HERE/concurrency.sh" --sock "$D_SOCK" --pid "$D_PID" --work "$SCRATCH" --runtime "$RUNTIME" \
    || die "concurrency bench failed"
  cat "$SCRATCH/concurrency.lines" >> "$LINES"
  stop_daemon
  rm -rf "$D_DIR"
fi

# ---- 3c. NBD over TLS against plaintext TCP, one daemon, the same volume ---------------
if has_part tls; then
  say "tls: nbds:// against plaintext nbd:// on one daemon, ${RUNTIME}s x $ROUNDS rounds"
  need openssl || die "the tls part needs openssl"
  CERTS="$SCRATCH/certs"
  mkdir -p "$CERTS"
  # The client checks no certificate (below), so one self-signed certificate does.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$CERTS/server-key.pem" -out "$CERTS/server-cert.pem" -days 2 \
    -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost > "$SCRATCH/openssl.log" 2>&1 \
    || die "openssl could not make the certificate: $(tail -3 "$SCRATCH/openssl.log")"
  nbd_port=$(node "$UTIL" free-port)
  new_daemon tls "" "$(printf 'addresses = ["127.0.0.1:%s"]\ntls = "on"\ntls_cert = "%s"\ntls_key = "%s"' \
    "$nbd_port" "$CERTS/server-cert.pem" "$CERTS/server-key.pem")"
  start_daemon
  # fio's nbd engine lets no URI name a local file (tls-certificates), so the client does
  # not check the certificate; the handshake and the encryption are the same.
  run_child "$SCRATCH/tls.lines" bash "$HERE/nbd-compare.sh" --uri "nbds://127.0.0.1:$nbd_port/bench?tls-verify-peer=false" \
    --reference "nbd://127.0.0.1:$nbd_port/bench" --size "$SIZE" --runtime "$RUNTIME" --rounds "$ROUNDS" \
    --workloads randread,randwrite,seqread,seqwrite --workdir "$SCRATCH" || die "the tls compare failed"
  # "WORKLOAD candidate=TLS reference=PLAIN ratio=R" -> tls WORKLOAD_{tls,plain,ratio} lines
  while read -r w c r q; do
    record tls "${w}_tls" "${c#*=}"; record tls "${w}_plain" "${r#*=}"; record tls "${w}_ratio" "${q#*=}"
  done < "$SCRATCH/tls.lines"
  stop_daemon
  rm -rf "$D_DIR" "$CERTS"
fi

# ---- 4. object store: drain and cold reads ------------------------------------------
if has_part store; then
  say "store: drain to MinIO and cold sequential reads with injected latency"
  run_child "$SCRATCH/store.lines" node "$HERE/store.mjs" || die "store bench failed"
  cat "$SCRATCH/store.lines" >> "$LINES"
fi

# ---- 4b. durable flush mode: FLUSH latency, fio with a FLUSH per write ---------------
if has_part durable; then
  say "durable: FLUSH latency with injected store latency, fio fsync on durable and demand volumes"
  run_child "$SCRATCH/durable.lines" node "$HERE/durable.mjs" || die "durable bench failed"
  cat "$SCRATCH/durable.lines" >> "$LINES"
fi

# ---- 5. microVM boot from a cold host, with and without the boot hot set -------------
if has_part vm; then
  say "vm: boot time of the test VM from a fork on a cold host, without and with the boot hot set"
  run_child "$SCRATCH/vm.lines" node "$HERE/vm.mjs" || die "vm bench failed"
  cat "$SCRATCH/vm.lines" >> "$LINES"
fi

# ---- 6. gc: reconciliation, deletion, refcount updates -------------------------------
if has_part gc; then
  say "gc: reconciliation per 1,000 manifests, deletion throughput, refcount update latency"
  run_child "$SCRATCH/gc.lines" node "$HERE/gc.mjs" || die "gc bench failed"
  cat "$SCRATCH/gc.lines" >> "$LINES"
fi

# ---- results ----------------------------------------------------------------------
record run elapsed_s $(($(date +%s) - STARTED_AT))
record run loadavg_end "$(cut -d" " -f1-3 /proc/loadavg | tr " " /)"
mkdir -p "$(dirname "$JSON_OUT")"
node "$UTIL" assemble "$JSON_OUT" "$SCRATCH/compare.json" "$LINES"
node "$UTIL" report "$JSON_OUT"
if [ "$(realpath "$JSON_OUT")" != "$(realpath -m ./bench-results.json)" ]; then cp "$JSON_OUT" ./bench-results.json; fi
echo "
results: ./bench-results.json" >&2
