// The commented updraft.toml that `updraft init` writes.

// Written by `updraft init`. Every key at its default; test/config.test.ts checks that it
// parses to the defaults and names every key of the schema.
export const CONFIG_TEMPLATE = `# updraft.toml: settings of the updraft daemon. Every key is optional; the values
# below are the defaults. Relative paths are relative to the folder of this file.
# String values may use \${VAR} for an environment variable; write $\${ for a literal \${.

[cache]
# Folder on local disk for the block cache.
dir = "./.updraft/cache"
# Disk tier of the block cache, in GB (> 0).
disk_size_gb = 50.0
# Memory tier of the block cache, in GB (0 turns it off).
memory_size_gb = 1.0
# Background scrub: cached blocks re-hashed per second; a block that fails is evicted
# (fetched again from the store when read). 0 turns it off.
scrub_blocks_per_second = 20
# Block writes to the disk tier bypass the page cache (O_DIRECT) where the filesystem
# allows it; false writes them through the page cache.
direct_writes = true
# Fault the memory tier in when the daemon starts, on a thread of its own, so filling it
# later costs no page faults; false lets the process grow as the tier fills.
memory_pretouch = true

[storage]
# Object store for packs and manifests: "file://PATH" (a folder), "s3://BUCKET/PREFIX",
# "gs://BUCKET/PREFIX" (Google Cloud Storage) or "az://CONTAINER/PREFIX" (Azure Blob Storage).
url = "file://./.updraft/store"
# Compression of blocks in packs: "lz4", "none" or "zstd-1" to "zstd-19".
compression = "lz4"
# Packs a sequential reader keeps fetched ahead of itself (0 turns read-ahead off).
read_ahead_packs = 8
# Password of an encrypted store; "" for none. Set when the store is created, it encrypts
# every block, index and manifest (XChaCha20-Poly1305, keyed BLAKE3 block names); it must
# then be given on every start. Keep it out of this file: "\${UPDRAFT_PASSWORD}".
# An existing store cannot be encrypted in place; change it with \`updraft change-password\`.
encryption_password = ""
# Seconds one attempt of an s3://, gs:// or az:// request may wait for an answer (or sit on a silent
# connection) before it fails and is tried again.
request_timeout_s = 10.0
# Seconds after which a store request fails, its retries included: a read that needs the
# store fails with EIO, a drain fails, a connection to a volume not on this host is refused.
request_deadline_s = 25.0

[aws]
# Credentials and endpoint for an s3:// storage url. Empty values use the AWS SDK's
# defaults (environment, shared config, instance role). Use \${VAR} to keep secrets out.

# Access key id; "" uses the SDK default chain.
access_key_id = ""
# Secret access key; "" uses the SDK default chain.
secret_access_key = ""
# An S3-compatible endpoint such as "http://127.0.0.1:9000"; "" means AWS.
endpoint = ""
# Region to sign requests for.
default_region = "us-east-1"
# Allow an http:// (unencrypted) endpoint.
allow_http = false
# Address buckets as ENDPOINT/BUCKET instead of BUCKET.ENDPOINT (MinIO and most S3 clones need it).
force_path_style = false

[gcs]
# Credentials and endpoint for a gs:// storage url (docs/stores.md lists the roles needed).

# Path of a service account's JSON key file; "" uses the client's default chain
# (GOOGLE_APPLICATION_CREDENTIALS, gcloud credentials, the metadata server).
service_account_key = ""
# Another endpoint, such as an emulator's "http://127.0.0.1:4443"; "" means Google's.
endpoint = ""
# Allow an http:// (unencrypted) endpoint.
allow_http = false

[azure]
# Credentials and endpoint for an az:// storage url: an account name with its key, a
# connection string, or an account name alone for the default Azure credential chain
# (environment, managed identity, Azure CLI). Use \${VAR} to keep secrets out.

# Storage account name.
account_name = ""
# Shared key of the account; "" for the default Azure credential chain.
account_key = ""
# A connection string instead of account_name and account_key.
connection_string = ""
# Blob service URL, such as an emulator's "http://127.0.0.1:10000/devstoreaccount1";
# "" means https://ACCOUNT.blob.core.windows.net.
endpoint = ""
# Allow an http:// (unencrypted) endpoint.
allow_http = false

[host]
# This host's identity in volume leases; "" generates one on first start and keeps it
# in the cache folder. Two daemons sharing a store must have different ids.
id = ""
# How long a volume lease lasts without renewal, in seconds. The holder renews at a third of it.
lease_ttl_s = 30
# How many seconds before another host may judge a lease expired its holder stops taking
# writes, unless renewed. Expiry is judged on the object store's clock (the lease object's
# Last-Modified), the holder's deadline on its own monotonic clock from when it sent the
# lease, so hosts' wall clocks never matter; the margin covers the store tick that notices
# (a quarter second), event-loop stalls and the store's clock running at another rate
# than the host's. Less than a third of lease_ttl_s.
clock_skew_margin_s = 3

[servers.nbd]
# TCP addresses to serve NBD on, as "host:port", e.g. ["0.0.0.0:10809", "[::1]:10809"].
addresses = []
# Unix socket to serve NBD on; "" disables it.
unix_socket = "./.updraft/nbd.sock"
# Size in GB of a volume created when a client asks for an export that does not exist; 0 disables auto-create.
auto_create_size_gb = 10.0
# Chunk size in bytes, the unit of dedup, caching and upload: a power of two from 65536 to 4194304.
block_size = 131072
# Blocks per pack object uploaded to the store (1 to 1000).
blocks_per_pack = 25
# Permissions of the unix socket, in octal.
socket_mode = "0660"
# TLS for NBD over TCP (NBD_OPT_STARTTLS): "off", "on" (the client chooses) or "require"
# (plaintext clients are refused). The unix socket offers TLS when it is on, never requires it.
tls = "off"
# Server certificate (PEM, with its chain) for TLS; needed unless tls = "off".
tls_cert = ""
# Private key (PEM) of tls_cert.
tls_key = ""

[servers.http]
# Address of the HTTP API and Prometheus metrics, as "host:port"; "" disables HTTP.
# Any address that is not loopback needs a token.
address = "127.0.0.1:8080"
# Bearer token every request must carry (Authorization: Bearer TOKEN), at least 16
# characters; "" for none. Keep it out of the file: token = "\${UPDRAFT_API_TOKEN}".
token = ""

[volumes]
# Seal a volume's dirty chunks after it has been idle this long, in milliseconds.
seal_idle_ms = 30000
# Seal in the background when a volume has more dirty overlay data than this, in MB.
seal_dirty_mb = 4096
# Default flush mode of a new volume: "demand" (the store is touched only by drain, fork,
# migration and the dirty budget), "continuous" (blocks and manifest follow the writes) or
# "durable" (a FLUSH is acknowledged once the store holds every write before it: a small
# log object of the changed sectors, shared by the FLUSHes of every durable volume).
flush_mode = "demand"
# Durable mode: a FLUSH fails (EIO) when the store has not taken its writes this long
# after it arrived, in milliseconds. The writes stay on this host.
durable_flush_timeout_ms = 30000
# Default dirty budget of a new volume, in GB: past it the oldest chunks not yet in the
# store are uploaded, even in demand mode.
dirty_budget_gb = 5.0
# Continuous mode: upload changed blocks this often, in milliseconds.
continuous_block_interval_ms = 5000
# Continuous mode: write the manifest this often while writes go on, in milliseconds
# (and as soon as the blocks are up once writes stop).
continuous_manifest_interval_ms = 60000
# A volume served read-only here while another host writes it (a replica) checks the
# volume's manifest in the store this often, in milliseconds, and serves a newer one at
# once; 0 turns following off (the replica stays at the manifest it was woken from).
replica_follow_interval_ms = 1000

[gc]
# Pack refcounts: "" keeps them in an embedded SQLite database in the cache folder (one
# host per store); "postgres://user:password@host:5432/db" shares one PostgreSQL
# database between every host of a store. Use \${VAR} for the password.
database_url = ""
# A pack no manifest or checkpoint names is deleted once it has been unreferenced this
# long: a duration such as "24h", "90s", "1h30m" or "0s".
grace_period = "24h"
# How often the daemon runs a deletion cycle.
interval = "10m"
# How often refcounts are reconciled with every manifest in the store (the safety net).
reconcile_interval = "30d"
# At most this many packs are deleted per cycle.
max_deletions_per_cycle = 1000
# Log what would be deleted, delete nothing.
dry_run = false

[cost]
# Prices of the object store, for the cost per volume and per host (dashboard, API,
# metrics). The defaults are S3 Standard list prices, US East (N. Virginia).
# Currency the prices are in.
currency = "USD"
# Per GB (10^9 bytes) stored for a month.
storage_gb_month = 0.023
# Per 1,000 PUT and LIST requests.
put_per_1000 = 0.005
# Per 1,000 GET and HEAD requests.
get_per_1000 = 0.0004
# Per 1,000 DELETE requests.
delete_per_1000 = 0.0
`;
