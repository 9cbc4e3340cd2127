# Sourced by the setup scripts of the test peers built from Go modules (MinIO,
# fake-gcs-server): `go install MODULE@VERSION` into a bin folder, with a progress line
# every 30 s, the build's log on failure, and VERSION recorded beside the binary.
#
#   go_build_cached TAG MODULE VERSION BINARY
#     TAG      prefix of every line printed (e.g. setup-minio)
#     BINARY   the path `go install` must produce (GOBIN is its folder)
# Exits the calling script with 1 when the build fails.
go_build_cached() {
  local tag=$1 module=$2 version=$3 binary=$4
  local bin started log pid status elapsed
  bin=$(dirname "$binary")
  mkdir -p "$bin"
  echo "$tag: building $module@$version with $(go version | cut -d' ' -f3) into $bin"
  started=$(date +%s)
  log=$(mktemp -t "$tag.XXXXXX")
  GOBIN="$bin" GOFLAGS="${GOFLAGS:-} -trimpath" go install "$module@$version" >"$log" 2>&1 &
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true' INT TERM
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$tag: still building ($(($(date +%s) - started)) s elapsed)"
    fi
  done
  status=0
  wait "$pid" || status=$?
  elapsed=$(($(date +%s) - started))
  if [ "$status" -ne 0 ] || [ ! -x "$binary" ]; then
    echo "$tag: FAILED after ${elapsed} s (go install exit $status); last lines of $log:" >&2
    tail -n 30 "$log" | sed 's/^/  /' >&2
    exit 1
  fi
  rm -f "$log"
  # A `go install` build does not know its module version (MinIO says DEVELOPMENT.GOGET): remember it.
  echo "$version" >"$binary.version"
  echo "$tag: built $binary from $module@$version in ${elapsed} s"
}
