#!/usr/bin/env -S node --initial-heap-size=96
// The `updraft` command's entry point, CommonJS on purpose: libuv sizes its thread pool
// from UV_THREADPOOL_SIZE when the pool is first used, and the ES module loader uses it
// before any module's code runs. The pool runs every fdatasync, large overlay read and
// write, slab write and seal read of every volume; with the default four threads, a few
// slow syncs hold up the host. A size the operator set wins. The first line passes the
// heap flag of node-flags.ts (kept equal to DAEMON_NODE_FLAGS; a test checks it).
process.env.UV_THREADPOOL_SIZE ??= '16';
void import('./main.js');
