// Volumes in a real S3-compatible store (MinIO on loopback, started here): the same
// portability suite as file://, through the AWS SDK.
import path from 'node:path';
import { after, before } from 'node:test';
import type { SharedStore } from './harness/cluster.js';
import { startMinio, type Minio } from './harness/minio.js';
import { definePortabilityTests } from './harness/portability.js';

let minio: Minio | undefined;
before(async () => {
  minio = await startMinio();
});
after(async () => {
  await minio?.stop();
});

/** One prefix per cluster, so clusters never see each other's objects. */
function s3Store(dir: string): SharedStore {
  if (!minio) throw new Error('MinIO did not start');
  return {
    label: 's3://',
    toml: {
      storage: { url: `s3://${minio.bucket}/${path.basename(dir)}` },
      aws: {
        access_key_id: minio.accessKeyId,
        secret_access_key: minio.secretAccessKey,
        endpoint: minio.endpoint,
        default_region: minio.region,
        allow_http: true,
        force_path_style: true,
      },
    },
  };
}

definePortabilityTests(s3Store, 's3:// (MinIO)');
