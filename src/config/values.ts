// Checks and parsers of single config values: addresses, durations, database and store URLs.
import { isIPv4, isIPv6 } from 'node:net';
// ---- addresses -------------------------------------------------------------------

const HOSTNAME_LABEL = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

/** The host and port of `address`, or why it is not a "host:port" address. */
export function splitHostPort(address: string): { host: string; port: number } | string {
  const colon = address.lastIndexOf(':');
  if (colon < 0) return 'the ":port" is missing';
  const hostPart = address.slice(0, colon);
  const portText = address.slice(colon + 1);
  const port = Number(portText);
  if (!/^[0-9]+$/.test(portText) || port < 1 || port > 65535) {
    return `port ${JSON.stringify(portText)} is not a number from 1 to 65535`;
  }
  if (hostPart === '') return 'the host is missing; use 0.0.0.0 or [::] for every interface';
  if (hostPart.startsWith('[')) {
    const inner = hostPart.endsWith(']') ? hostPart.slice(1, -1) : '';
    if (!isIPv6(inner)) return `${JSON.stringify(hostPart)} is not a bracketed IPv6 address`;
    return { host: inner, port };
  }
  if (hostPart.includes(':')) return `an IPv6 address goes in brackets, e.g. "[${hostPart}]:${portText}"`;
  if (/^[0-9.]+$/.test(hostPart)) {
    return isIPv4(hostPart) ? { host: hostPart, port } : `${JSON.stringify(hostPart)} is not an IPv4 address`;
  }
  const name = hostPart.endsWith('.') ? hostPart.slice(0, -1) : hostPart;
  if (name.length > 253 || !name.split('.').every((label) => HOSTNAME_LABEL.test(label))) {
    return `${JSON.stringify(hostPart)} is not a hostname`;
  }
  return { host: hostPart, port };
}

/** Splits "host:port" (IPv4, [IPv6] or hostname; port 1..65535). IPv6 hosts are returned without brackets. */
export function parseHostPort(address: string): { host: string; port: number } {
  const parsed = splitHostPort(address);
  if (typeof parsed === 'string') throw new Error(`${JSON.stringify(address)} is not a "host:port" address: ${parsed}`);
  return parsed;
}

export function hostPortProblem(address: string): string | undefined {
  const parsed = splitHostPort(address);
  return typeof parsed === 'string' ? parsed : undefined;
}

// ---- durations -------------------------------------------------------------------

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION = /^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$/;

/** Why `text` is not a duration such as "24h", "90s", "1h30m" or "0s", or undefined. */
export function durationProblem(text: string): string | undefined {
  if (!DURATION.test(text)) return 'expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "1h30m", "0s"';
  return parseDuration(text) > 10 * 365 * DURATION_UNITS.d ? 'longer than ten years' : undefined;
}

/** A duration string in milliseconds: "24h", "90s", "1h30m", "0s", "500ms". */
export function parseDuration(text: string): number {
  if (!DURATION.test(text)) throw new Error(`duration ${JSON.stringify(text)}: expected a number with a unit (ms, s, m, h, d), e.g. "24h", "90s", "0s"`);
  let ms = 0;
  for (const [, amount, unit] of text.matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) ms += Number(amount) * DURATION_UNITS[unit];
  return Math.round(ms);
}

// ---- gc database ------------------------------------------------------------------

export function databaseUrlProblem(url: string): string | undefined {
  if (url === '') return undefined;
  if (!/^postgres(ql)?:\/\//.test(url)) return 'the scheme must be postgres:// or postgresql://';
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return 'not a URL';
  }
  if (parsed.hostname === '' && !parsed.searchParams.has('host')) return 'no host (postgres://user:password@host:5432/database)';
  if (parsed.port !== '' && !(Number(parsed.port) >= 1 && Number(parsed.port) <= 65535)) return `port ${parsed.port} is not from 1 to 65535`;
  return undefined;
}

// ---- storage ---------------------------------------------------------------------

export const FILE_SCHEME = 'file://';
const S3_SCHEME = 's3://';
const GCS_SCHEME = 'gs://';
export const AZURE_SCHEMES = ['az://', 'azure://'];

/** Why `bucket` breaks the S3 bucket naming rules, or undefined when it follows them. */
export function s3BucketProblem(bucket: string): string | undefined {
  if (bucket.length < 3 || bucket.length > 63) return `bucket name ${JSON.stringify(bucket)} is not 3 to 63 characters`;
  if (!/^[a-z0-9][a-z0-9.-]*[a-z0-9]$/.test(bucket)) {
    return `bucket name ${JSON.stringify(bucket)} must be lowercase letters, digits, "." and "-", starting and ending with a letter or digit`;
  }
  if (bucket.includes('..')) return `bucket name ${JSON.stringify(bucket)} has two adjacent dots`;
  if (isIPv4(bucket)) return `bucket name ${JSON.stringify(bucket)} is an IP address`;
  const reservedPrefix = ['xn--', 'sthree-', 'amzn-s3-demo-'].find((prefix) => bucket.startsWith(prefix));
  if (reservedPrefix) return `bucket names starting with "${reservedPrefix}" are reserved`;
  const reservedSuffix = ['-s3alias', '--ol-s3', '.mrap', '--x-s3', '--table-s3'].find((suffix) => bucket.endsWith(suffix));
  if (reservedSuffix) return `bucket names ending with "${reservedSuffix}" are reserved`;
  return undefined;
}

/** Why `bucket` breaks the GCS bucket naming rules (3-63 characters, or up to 222 with dots). */
export function gcsBucketProblem(bucket: string): string | undefined {
  if (!/^[a-z0-9][a-z0-9._-]*[a-z0-9]$/.test(bucket)) {
    return `bucket name ${JSON.stringify(bucket)} must be lowercase letters, digits, "-", "_" and ".", starting and ending with a letter or digit`;
  }
  if (bucket.length < 3 || bucket.length > 222 || bucket.split('.').some((part) => part.length > 63)) return `bucket name ${JSON.stringify(bucket)} is not 3 to 63 characters (222 with dots)`;
  return undefined;
}

/** Why `container` breaks the Azure container naming rules. */
export function azureContainerProblem(container: string): string | undefined {
  if (!/^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$/.test(container)) {
    return `container name ${JSON.stringify(container)} must be 3 to 63 lowercase letters, digits and single "-", starting and ending with a letter or digit`;
  }
  return undefined;
}

export function storageUrlProblem(url: string): string | undefined {
  if (url.startsWith(FILE_SCHEME)) return url.length > FILE_SCHEME.length ? undefined : 'the path is empty';
  const first = (rest: string) => (rest.indexOf('/') < 0 ? rest : rest.slice(0, rest.indexOf('/')));
  if (url.startsWith(S3_SCHEME)) return s3BucketProblem(first(url.slice(S3_SCHEME.length)));
  if (url.startsWith(GCS_SCHEME)) return gcsBucketProblem(first(url.slice(GCS_SCHEME.length)));
  const azure = AZURE_SCHEMES.find((scheme) => url.startsWith(scheme));
  if (azure) return azureContainerProblem(first(url.slice(azure.length)));
  return '';
}

// ---- schema ----------------------------------------------------------------------
