// Volumes in a real S3-compatible store (MinIO on loopback, started here): the same
// portability suite as file://, through the AWS SDK.
import { after, before } from 'node:test';
import { minioStore, startMinio, type Minio } from './harness/minio.js';
import { definePortabilityTests } from './harness/portability.js';

let minio: Minio | undefined;
before(async () => {
  minio = await startMinio();
});
after(async () => {
  await minio?.stop();
});

definePortabilityTests((dir) => minioStore(minio, dir), 's3:// (MinIO)');
