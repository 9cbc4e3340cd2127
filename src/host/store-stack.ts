// The object store a daemon or an offline command talks to, built from the config.
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config/config.js';
import { errorMessage, type Logger } from '../log.js';
import { openObjectStore } from '../objectstore/index.js';
import { parseFaultSpec, withFaults } from '../objectstore/faults.js';
import { withMetering, type MeteredObjectStore } from '../objectstore/metered.js';
import { withRetries } from '../objectstore/retry.js';
import type { ObjectStore } from '../objectstore/types.js';

/**
 * The object store stack: retries over metering (every attempt that reaches the store
 * is counted) over the optional fault injector (UPDRAFT_STORE_FAULTS, for tests and
 * benchmarks) over the backend. Every request is bounded: an attempt by [storage]
 * request_timeout_s, a request with its retries by request_deadline_s.
 */
export function openStore(config: Config, log: Logger): { store: ObjectStore; metered: MeteredObjectStore } {
  const aws = config.aws;
  if (config.storage.url.startsWith('file://')) {
    // The embedded store is a folder of ours: create it on first start.
    const folder = fileURLToPath(config.storage.url);
    try {
      fs.mkdirSync(folder, { recursive: true });
    } catch (err) {
      throw new Error(`object store ${config.storage.url}: cannot create folder ${folder}: ${errorMessage(err)}`);
    }
  }
  let store: ObjectStore = openObjectStore(
    config.storage.url,
    {
      accessKeyId: aws.accessKeyId || undefined,
      secretAccessKey: aws.secretAccessKey || undefined,
      endpoint: aws.endpoint || undefined,
      region: aws.defaultRegion,
      allowHttp: aws.allowHttp,
      forcePathStyle: aws.forcePathStyle,
      requestTimeoutMs: config.storage.requestTimeoutMs,
    },
    log,
    {
      gcs: {
        serviceAccountKey: config.gcs.serviceAccountKey || undefined,
        endpoint: config.gcs.endpoint || undefined,
        allowHttp: config.gcs.allowHttp,
        requestTimeoutMs: config.storage.requestTimeoutMs,
      },
      azure: {
        accountName: config.azure.accountName || undefined,
        accountKey: config.azure.accountKey || undefined,
        connectionString: config.azure.connectionString || undefined,
        endpoint: config.azure.endpoint || undefined,
        allowHttp: config.azure.allowHttp,
        requestTimeoutMs: config.storage.requestTimeoutMs,
      },
    },
  );
  const faults = process.env.UPDRAFT_STORE_FAULTS;
  if (faults) {
    log.warn('object store fault injection is on (UPDRAFT_STORE_FAULTS)', { spec: faults });
    store = withFaults(store, parseFaultSpec(faults));
  }
  const metered = withMetering(store);
  return { store: withRetries(metered, { log, deadlineMs: config.storage.requestDeadlineMs }), metered };
}


