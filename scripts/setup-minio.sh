#!/usr/bin/env bash
# Builds the MinIO server the object-store tests run against, once, into the test cache:
#   ${UPDRAFT_TEST_CACHE:-$HOME/.cache/updraft-test}/bin/minio
# Needs Go (>= 1.24) and the Go module proxy. Takes 5-15 minutes on 2 cores the first time;
# afterwards it is one summary line. Fails loudly (non-zero exit) if the build fails, since
# the object-store tests cannot run without it.

set -euo pipefail

# MinIO publishes no semver tags usable by `go install`, so @latest resolves to a
# pseudo-version of master; pin the one this was last checked against (builds with Go 1.26).
MINIO_VERSION=${UPDRAFT_MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}

cache=${UPDRAFT_TEST_CACHE:-$HOME/.cache/updraft-test}
bin="$cache/bin"
minio="$bin/minio"

if [ -x "$minio" ]; then
  echo "setup-minio: $minio present (built from github.com/minio/minio@$(cat "$minio.version" 2>/dev/null || echo unknown))"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "setup-minio: FAILED: 'go' is not on PATH; install Go >= 1.24 to build $minio" >&2
  exit 1
fi

mkdir -p "$bin"
echo "setup-minio: building github.com/minio/minio@$MINIO_VERSION with $(go version | cut -d' ' -f3) into $bin"
echo "setup-minio: this takes 5-15 minutes on a small machine; progress every 30 s"

started=$(date +%s)
log=$(mktemp -t setup-minio.XXXXXX)
GOBIN="$bin" GOFLAGS="${GOFLAGS:-} -trimpath" go install "github.com/minio/minio@$MINIO_VERSION" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' INT TERM
while kill -0 "$pid" 2>/dev/null; do
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "setup-minio: still building ($(($(date +%s) - started)) s elapsed)"
  fi
done
status=0
wait "$pid" || status=$?
elapsed=$(($(date +%s) - started))

if [ "$status" -ne 0 ] || [ ! -x "$minio" ]; then
  echo "setup-minio: FAILED after ${elapsed} s (go install exit $status); last lines of $log:" >&2
  tail -n 30 "$log" | sed 's/^/  /' >&2
  exit 1
fi
rm -f "$log"
# `minio --version` of a `go install` build says only DEVELOPMENT.GOGET; remember what it is.
echo "$MINIO_VERSION" >"$minio.version"
echo "setup-minio: built $minio from github.com/minio/minio@$MINIO_VERSION in ${elapsed} s"
