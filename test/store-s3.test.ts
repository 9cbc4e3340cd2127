// Volumes in a real S3-compatible store (MinIO on loopback, started here): the same
// portability suite as file://, through the AWS SDK.

import { minioForTests, minioStore } from './harness/minio.js';
import { definePortabilityTests } from './harness/portability.js';

const minio = minioForTests();

definePortabilityTests((dir) => minioStore(minio(), dir), 's3:// (MinIO)');
