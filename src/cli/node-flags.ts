// The Node.js flags the daemon runs with. The `updraft` command's first line passes them;
// a daemon started as `node …/updraft.cjs run` without them says so in its log.

/**
 * V8 counts the buffer of every socket read as external memory, and counts the external
 * memory allocated since its last full collection against the old generation's limit.
 * The daemon's heap is small, so that limit sits a few tens of MB above it, and a volume
 * streaming large writes reaches it after every few scavenges: a full collection every
 * few writes (docs/benchmarks.md: large writes and the garbage collector). A 96 MB
 * floor keeps the limit above what a scavenge cycle's reads add.
 */
export const DAEMON_NODE_FLAGS: readonly string[] = ['--initial-heap-size=96'];

/** The flags of DAEMON_NODE_FLAGS this process was not started with (their names, whatever the value). */
export function missingNodeFlags(execArgv: readonly string[] = process.execArgv): string[] {
  return DAEMON_NODE_FLAGS.filter((flag) => {
    const name = flag.split('=')[0];
    return !execArgv.some((arg) => arg === name || arg.startsWith(`${name}=`));
  });
}
