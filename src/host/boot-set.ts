// A volume's boot hot set: the chunks a guest reads while it boots, recorded once (on the
// first boot after a bless with --boot-record) and stored beside the manifest, then
// fetched in parallel when a volume forked from it wakes, before the guest asks for them.
import type { StoreCipher } from '../crypto/cipher.js';
import { errorMessage, type Logger } from '../log.js';
import { isPreconditionFailed, type ObjectStore } from '../objectstore/types.js';
import { readBootSet, writeBootSet } from '../store/catalog.js';
import type { PackFetcher } from '../store/fetch.js';
import type { ManifestMeta } from '../store/manifest.js';
import type { Volume } from '../volume/volume.js';

/** What boot hot sets are read from, written to and fetched with. */
export interface BootSetContext {
  store: ObjectStore;
  cipher: StoreCipher;
  fetcher: PackFetcher;
  log: Logger;
}

/**
 * While the client boots: fetch the blocks of the volume's boot hot set (or its
 * parent's) in parallel, before the guest asks for them. When the set is a recording
 * request (`updraft bless --boot-record`), record this boot and answer the request.
 */
export async function fetchBootSet(ctx: BootSetContext, volume: Volume, meta: ManifestMeta): Promise<void> {
  try {
    const found = await readBootSet(ctx.store, meta, ctx.cipher);
    if (found === undefined) return;
    const { set, etag } = found;
    if (set.recording) {
      recordBootInto(ctx, volume, set.volume, set.seconds, etag);
      ctx.log.info('recording the boot hot set requested at bless', { volume: volume.name, for: set.volume, seconds: set.seconds });
      return;
    }
    const keys = volume.missingBlocksOf(set.chunks);
    const started = performance.now();
    await ctx.fetcher.fetch(keys, 'hotset');
    ctx.log.info('fetched the boot hot set', { volume: volume.name, from: set.volume, chunks: set.chunks.length, blocks: keys.length, ms: Math.round(performance.now() - started) });
  } catch (err) {
    ctx.log.warn('boot hot set fetch failed; blocks come on demand', { volume: volume.name, error: errorMessage(err) });
  }
}

/** Record `volume`'s next boot as the boot set of `owner` (itself, or the image it was forked from). */
export function recordBootInto(ctx: BootSetContext, volume: Volume, owner: string, seconds: number, replacing?: string): void {
  volume.recordBoot(seconds, (chunks) => {
    writeBootSet(ctx.store, { format: 1, volume: owner, blockSize: volume.blockSize, seconds, chunks }, ctx.cipher, replacing)
      .then(() => ctx.log.info('stored the boot hot set', { volume: owner, recorded_on: volume.name, chunks: chunks.length }))
      .catch((err) => {
        if (isPreconditionFailed(err)) ctx.log.info('another host answered the boot recording request first', { volume: owner });
        else ctx.log.error('cannot store the boot hot set', { volume: owner, error: errorMessage(err) });
      });
  });
}
