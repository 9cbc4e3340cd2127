// What the object store costs, per volume and per host, at the prices of the config's
// [cost] section: storage by the GB-month, requests by the thousand. The defaults are
// S3 Standard list prices for US East (N. Virginia) (docs/dashboard.md says as of when).
// Storage is a rate (what a month at today's stored bytes costs); requests are what those
// counted since the daemon started cost.
import type { RequestKind } from '../objectstore/types.js';

export { S3_STANDARD_PRICES, type CostPrices } from '../config/prices.js';
import type { CostPrices } from '../config/prices.js';

export interface Cost {
  currency: string;
  stored_bytes: number;
  /** What a month of storing stored_bytes costs. */
  storage_per_month: number;
  /** Requests counted since start, by price class. */
  requests: { put: number; get: number; delete: number };
  /** What those requests cost. */
  requests_cost: number;
}

/** Which price a request kind is billed at (S3: LIST is billed as a PUT, HEAD as a GET). */
const PRICE_CLASS: Record<RequestKind, 'put' | 'get' | 'delete'> = {
  put: 'put', list: 'put', get: 'get', get_range: 'get', head: 'get', delete: 'delete',
};

const GB = 1e9;

export function costOf(prices: CostPrices, storedBytes: number, requests: Readonly<Record<RequestKind, number>>): Cost {
  const byClass = { put: 0, get: 0, delete: 0 };
  for (const [kind, n] of Object.entries(requests) as Array<[RequestKind, number]>) byClass[PRICE_CLASS[kind]] += n;
  const requestsCost = (byClass.put * prices.putPer1000 + byClass.get * prices.getPer1000 + byClass.delete * prices.deletePer1000) / 1000;
  return {
    currency: prices.currency,
    stored_bytes: storedBytes,
    storage_per_month: (storedBytes / GB) * prices.storageGbMonth,
    requests: byClass,
    requests_cost: requestsCost,
  };
}
