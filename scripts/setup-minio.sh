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

echo "setup-minio: this takes 5-15 minutes on a small machine; progress every 30 s"
# shellcheck source=go-build-cached.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-build-cached.sh"
go_build_cached setup-minio github.com/minio/minio "$MINIO_VERSION" "$minio"
