#!/usr/bin/env bash
# Installs the Debian packages the integration tests drive, when they are missing and we
# are root. Never fails the run: a test that needs a missing tool skips (or, under CI,
# fails naming the package), so the tests decide, not this script.
#
# Quiet when everything is present: one summary line. Idempotent.

set -u

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

have() { command -v "$1" >/dev/null 2>&1; }

fio_has_nbd_engine() { have fio && fio --enghelp 2>/dev/null | grep -qx $'\tnbd'; }

# command -> Debian package
checks=(
  "nbdinfo libnbd-bin"
  "nbdcopy libnbd-bin"
  "nbdfuse libnbd-bin"
  "nbdsh python3-libnbd"
  "nbdkit nbdkit"
  "qemu-img qemu-utils"
  "mkfs.ext4 e2fsprogs"
  "e2fsck e2fsprogs"
  "fusermount3 fuse3"
  "losetup util-linux"
  "openssl openssl"
  "ss iproute2"
  "qemu-system-x86_64 qemu-system-x86"
  "debugfs e2fsprogs"
  "g++ g++"
  "chromium chromium"
)

missing_packages() {
  local entry cmd pkg
  local -A seen=()
  for entry in "${checks[@]}"; do
    cmd=${entry%% *}
    pkg=${entry#* }
    if ! have "$cmd" && [ -z "${seen[$pkg]:-}" ]; then
      seen[$pkg]=1
      printf '%s\n' "$pkg"
    fi
  done
  if ! fio_has_nbd_engine; then printf '%s\n' fio; fi
  # The VM boot test: a static busybox for the guest's root filesystem, a kernel and initrd.
  if ! dpkg -s busybox-static >/dev/null 2>&1; then printf '%s\n' busybox-static; fi
  if ! compgen -G '/boot/vmlinuz-*' >/dev/null; then printf '%s\n' linux-image-amd64; fi
  # The GC tests on PostgreSQL: the server binaries (not on PATH; the tests find them there).
  if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then printf '%s\n' postgresql; fi
}

mapfile -t missing < <(missing_packages)

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup-test-deps: all test tools present (libnbd-bin python3-libnbd nbdkit fio+nbd qemu-utils e2fsprogs fuse3 util-linux openssl qemu-system-x86 busybox-static linux-image-amd64 postgresql chromium)"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-test-deps: missing ${missing[*]}; not root, so not installing (tests that need them skip, or fail under CI)"
  exit 0
fi
if ! have apt-get; then
  echo "setup-test-deps: missing ${missing[*]}; no apt-get here, so not installing"
  exit 0
fi

log=$(mktemp -t setup-test-deps.XXXXXX)
limit=()
if have timeout; then limit=(timeout 900); fi
export DEBIAN_FRONTEND=noninteractive
if "${limit[@]}" apt-get update -qq >"$log" 2>&1 &&
  "${limit[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
  mapfile -t still < <(missing_packages)
  if [ "${#still[@]}" -eq 0 ]; then
    echo "setup-test-deps: installed ${missing[*]}"
  else
    echo "setup-test-deps: apt-get installed ${missing[*]}, yet still missing: ${still[*]}"
    if [[ " ${still[*]} " == *" fio "* ]] && have fio; then
      echo "setup-test-deps: this fio has no nbd engine (fio --enghelp does not list nbd)"
    fi
  fi
  rm -f "$log"
else
  echo "setup-test-deps: apt-get failed installing ${missing[*]}; last lines of $log:"
  tail -n 15 "$log" | sed 's/^/  /'
fi
exit 0
