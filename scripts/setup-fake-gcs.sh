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

# shellcheck source=go-build-cached.sh
source "$(dirname "${BASH_SOURCE[0]}")/go-build-cached.sh"
go_build_cached setup-fake-gcs github.com/fsouza/fake-gcs-server "$FAKE_GCS_VERSION" "$server"
