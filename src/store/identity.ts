// store.json (DESIGN.md: Formats): the store's identity and whether, and how, it is
// encrypted. Written once, when the first daemon or offline command opens an empty or
// older store; afterwards only `updraft change-password` rewrites it (conditionally).
//
//   {
//     "format": 1,
//     "id": "<32 hex digits, random>",
//     "created": "<ISO time>",
//     "encryption": null                       // a plaintext store, or:
//     "encryption": {
//       "cipher": "xchacha20-poly1305",        // crypto/cipher.ts
//       "names": "keyed-blake3",
//       "kdf": { "alg": "argon2id13", "opslimit": 3, "memlimit": 67108864, "salt": "<base64, 16 bytes>" },
//       "wrapped_key": "<base64: nonce ‖ XChaCha20-Poly1305 of the data key ‖ tag, 72 bytes>",
//       "password_changed"?: "<ISO time>"
//     }
//   }
//
// The data key is wrapped under a key derived from the password with Argon2id, with the
// AAD "updraft data key\0" ‖ id. The key itself, the password and anything derived from
// them are never written anywhere. Encryption is chosen when the store is created: an
// encrypted store is only created empty, a plaintext store stays plaintext, and every
// object carries its cipher id, so no store is ever mixed.
import crypto from 'node:crypto';
import * as z from 'zod';
import { cipherName, CIPHER_XCHACHA20_POLY1305, newDataKey, OpenError, PLAINTEXT, sealLabel, storeCipher, type StoreCipher } from '../crypto/cipher.js';
import { KDF_ALG, kdfProblem, keyEncryptionKey, newKdfParams, unwrapDataKey, WRAPPED_KEY_BYTES, wrapDataKey, type KdfParams } from '../crypto/password.js';
import { isPreconditionFailed, type ObjectStore } from '../objectstore/types.js';
import { PROBE_KEY, probeObjectStore } from '../objectstore/index.js';
import { fieldProblem, isoTimeField } from './fields.js';

export const IDENTITY_KEY = PROBE_KEY;

/** The store cannot be opened as configured: wrong, missing or unexpected password, or a bad store.json. Nothing was written. */
export class StoreKeyError extends Error {
  override name = 'StoreKeyError';
}

const base64Field = (bytes: number) =>
  z.string().refine((s) => /^[A-Za-z0-9+/]*={0,2}$/.test(s) && Buffer.from(s, 'base64').length === bytes, `expected ${bytes} bytes in base64`);

const ENCRYPTION_SCHEMA = z.object({
  cipher: z.literal(cipherName(CIPHER_XCHACHA20_POLY1305)),
  names: z.literal('keyed-blake3'),
  kdf: z.object({ alg: z.literal(KDF_ALG), opslimit: z.number().int(), memlimit: z.number().int(), salt: base64Field(16) }),
  wrapped_key: base64Field(WRAPPED_KEY_BYTES),
  password_changed: isoTimeField.optional(),
});

const IDENTITY_SCHEMA = z.object({
  format: z.literal(1),
  id: z.string().regex(/^[0-9a-f]{32}$/, 'expected 32 lowercase hex digits'),
  created: isoTimeField,
  encryption: ENCRYPTION_SCHEMA.nullable(),
});

export type StoreIdentity = z.infer<typeof IDENTITY_SCHEMA>;
type Encryption = z.infer<typeof ENCRYPTION_SCHEMA>;

export interface OpenedStore {
  identity: StoreIdentity;
  /** PLAINTEXT, or the cipher of the unwrapped data key. */
  cipher: StoreCipher;
  /** This call wrote store.json (a new store, or an older one that had none). */
  created: boolean;
}

/** A one-line description for logs and `updraft status`. */
export function describeEncryption(identity: StoreIdentity): string {
  const e = identity.encryption;
  if (e === null) return 'not encrypted';
  const mib = Math.round(e.kdf.memlimit / 1048576);
  return `encrypted: ${e.cipher}, ${e.names} block names, data key wrapped with ${e.kdf.alg} (${e.kdf.opslimit} passes, ${mib} MiB)`;
}

/** Parse store.json; StoreKeyError naming the store when it is not one. */
export function decodeIdentity(store: ObjectStore, body: Buffer): StoreIdentity {
  const where = `store ${store.description}: ${IDENTITY_KEY}`;
  let value: unknown;
  try {
    value = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw new StoreKeyError(`${where} is not JSON (${(err as Error).message}); it is not a store identity`);
  }
  const parsed = IDENTITY_SCHEMA.safeParse(value);
  if (!parsed.success) throw new StoreKeyError(`${where} is not a store identity: ${fieldProblem(parsed.error)}`);
  const kdf = parsed.data.encryption?.kdf;
  const problem = kdf && kdfProblem({ ...kdf, salt: Buffer.from(kdf.salt, 'base64') });
  if (problem) throw new StoreKeyError(`${where}: argon2id parameters refused: ${problem}`);
  return parsed.data;
}

function kdfParams(e: Encryption): KdfParams {
  return { alg: KDF_ALG, opslimit: e.kdf.opslimit, memlimit: e.kdf.memlimit, salt: Buffer.from(e.kdf.salt, 'base64') };
}

async function wrapFor(password: string, id: string, dataKey: Buffer): Promise<Encryption> {
  const params = newKdfParams();
  const kek = await keyEncryptionKey(password, params);
  return {
    cipher: 'xchacha20-poly1305',
    names: 'keyed-blake3',
    kdf: { alg: KDF_ALG, opslimit: params.opslimit, memlimit: params.memlimit, salt: params.salt.toString('base64') },
    wrapped_key: wrapDataKey(kek, dataKey, sealLabel('data key', id)).toString('base64'),
  };
}

/** The data key of an encrypted store; StoreKeyError when `password` is not its password. */
async function unwrap(store: ObjectStore, identity: StoreIdentity & { encryption: Encryption }, password: string): Promise<Buffer> {
  const e = identity.encryption;
  const kek = await keyEncryptionKey(password, kdfParams(e));
  try {
    return unwrapDataKey(kek, Buffer.from(e.wrapped_key, 'base64'), sealLabel('data key', identity.id));
  } catch (err) {
    if (!(err instanceof OpenError)) throw err;
    throw new StoreKeyError(
      `store ${store.description}: wrong encryption password: the data key in ${IDENTITY_KEY} does not unwrap with [storage] encryption_password`,
    );
  }
}

/** The first key under `prefix`, or undefined when there is none. */
async function anyObject(store: ObjectStore, prefix: string): Promise<string | undefined> {
  return (await store.list(prefix))[0]?.key;
}

/**
 * Open the store for use (the start-up probe included): read store.json, unwrap the data
 * key with `password` ("" for none), or write store.json when the store has none. Throws
 * StoreKeyError (and writes nothing) for a wrong password, a missing password for an
 * encrypted store, a password for a plaintext store, or a password for a store that
 * already holds plaintext objects.
 */
export async function openStoreIdentity(store: ObjectStore, password: string): Promise<OpenedStore> {
  let body = await probeObjectStore(store);
  let created = false;
  for (let attempt = 0; attempt < 3; attempt++) {
    if (body !== undefined) {
      const identity = decodeIdentity(store, body);
      const e = identity.encryption;
      if (e === null) {
        if (password !== '') {
          throw new StoreKeyError(
            `store ${store.description} is not encrypted (its ${IDENTITY_KEY} says so: it was created without a password), but ` +
              '[storage] encryption_password is set. Remove the password, or use a new, empty store to encrypt: a store is never mixed',
          );
        }
        return { identity, cipher: PLAINTEXT, created };
      }
      if (password === '') {
        throw new StoreKeyError(`store ${store.description} is encrypted (${IDENTITY_KEY}): set [storage] encryption_password to its password`);
      }
      const dataKey = await unwrap(store, { ...identity, encryption: e }, password);
      return { identity, cipher: storeCipher(dataKey), created };
    }
    // No store.json: a new store, or one from before store.json existed (always plaintext).
    if (password !== '') {
      const existing = (await anyObject(store, 'volumes/')) ?? (await anyObject(store, 'packs/'));
      if (existing !== undefined) {
        throw new StoreKeyError(
          `store ${store.description} has no ${IDENTITY_KEY} but already holds unencrypted objects (such as ${existing}), and ` +
            '[storage] encryption_password is set. Encryption is chosen when a store is created and a store is never mixed: ' +
            'remove the password, or use a new, empty store',
        );
      }
    }
    const id = crypto.randomBytes(16).toString('hex');
    const identity: StoreIdentity = {
      format: 1, id, created: new Date().toISOString(), encryption: password === '' ? null : await wrapFor(password, id, newDataKey()),
    };
    try {
      await store.put(IDENTITY_KEY, Buffer.from(JSON.stringify(identity, null, 2) + '\n'), { ifNoneMatch: '*' });
      created = true;
    } catch (err) {
      if (!isPreconditionFailed(err)) throw err;
    }
    // Read back what is there: ours, or the one a concurrent first start wrote.
    body = (await store.get(IDENTITY_KEY))?.body;
  }
  throw new Error(`store ${store.description}: ${IDENTITY_KEY} keeps changing; try again`);
}

/** store.json as it is, without a password (`updraft status`); undefined when the store has none yet. */
export async function readIdentity(store: ObjectStore): Promise<StoreIdentity | undefined> {
  const body = await probeObjectStore(store);
  return body === undefined ? undefined : decodeIdentity(store, body);
}

/**
 * Wrap the data key under `newPassword` (new salt) in place of `oldPassword`: one
 * conditional rewrite of store.json, no other object touched. StoreKeyError for a
 * plaintext store or a wrong old password.
 */
export async function changePassword(store: ObjectStore, oldPassword: string, newPassword: string): Promise<StoreIdentity> {
  if (newPassword === '') throw new StoreKeyError('the new password is empty');
  const object = await store.get(IDENTITY_KEY);
  if (object === undefined) throw new StoreKeyError(`store ${store.description} has no ${IDENTITY_KEY}: it is not an encrypted store`);
  const identity = decodeIdentity(store, object.body);
  const e = identity.encryption;
  if (e === null) throw new StoreKeyError(`store ${store.description} is not encrypted: it has no password to change`);
  if (oldPassword === '') throw new StoreKeyError(`store ${store.description} is encrypted: set [storage] encryption_password to its current password`);
  const dataKey = await unwrap(store, { ...identity, encryption: e }, oldPassword);
  const next: StoreIdentity = {
    ...identity, encryption: { ...(await wrapFor(newPassword, identity.id, dataKey)), password_changed: new Date().toISOString() },
  };
  try {
    await store.put(IDENTITY_KEY, Buffer.from(JSON.stringify(next, null, 2) + '\n'), { ifMatch: object.etag });
  } catch (err) {
    if (!isPreconditionFailed(err)) throw err;
    throw new StoreKeyError(`store ${store.description}: ${IDENTITY_KEY} changed while the password was being changed; nothing was changed, try again`);
  }
  return next;
}
