#!/usr/bin/env bash
# Builds fake-gcs-server, the Google Cloud Storage emulator the gs:// tests run against,
# once, into the test cache:
#   ${UPDRAFT_TEST_CACHE:-$HOME/.cache/updraft-test}/bin/fake-gcs-server
# Needs Go (>= 1.24) and the Go module proxy. Takes a few minutes on 2 cores the first
# time; afterwards it is one summary line. Fails loudly (non-zero exit) if the build fails,
# since the gs:// tests cannot run without it.

set -euo pipefail

FAKE_GCS_VERSION=${UPDRAFT_FAKE_GCS_VERSION:-v1.56.1}

cache=${UPDRAFT_TEST_CACHE:-$HOME/.cache/updraft-test}
bin="$cache/bin"
server="$bin/fake-gcs-server"

if [ -x "$server" ] && [ "$(cat "$server.version" 2>/dev/null)" = "$FAKE_GCS_VERSION" ]; then
  echo "setup-fake-gcs: $server present (built from github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION)"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "setup-fake-gcs: FAILED: 'go' is not on PATH; install Go >= 1.24 to build $server" >&2
  exit 1
fi

mkdir -p "$bin"
echo "setup-fake-gcs: building github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION with $(go version | cut -d' ' -f3) into $bin"

started=$(date +%s)
log=$(mktemp -t setup-fake-gcs.XXXXXX)
GOBIN="$bin" GOFLAGS="${GOFLAGS:-} -trimpath" go install "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' INT TERM
while kill -0 "$pid" 2>/dev/null; do
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "setup-fake-gcs: still building ($(($(date +%s) - started)) s elapsed)"
  fi
done
status=0
wait "$pid" || status=$?
elapsed=$(($(date +%s) - started))

if [ "$status" -ne 0 ] || [ ! -x "$server" ]; then
  echo "setup-fake-gcs: FAILED after ${elapsed} s (go install exit $status); last lines of $log:" >&2
  tail -n 30 "$log" | sed 's/^/  /' >&2
  exit 1
fi
rm -f "$log"
echo "$FAKE_GCS_VERSION" >"$server.version"
echo "setup-fake-gcs: built $server from github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION in ${elapsed} s"
