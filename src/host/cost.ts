// What the object store costs, per volume and per host, at the prices of the config's
// [cost] section: storage by the GB-month, requests by the thousand. The defaults are
// S3 Standard list prices for US East (N. Virginia) (docs/dashboard.md says as of when).
// Storage is a rate (what a month at today's stored bytes costs); requests are what those
// counted since the daemon started cost.
import type { RequestKind } from '../objectstore/types.js';

export interface CostPrices {
  /** Currency the prices are in, shown beside every figure. */
  currency: string;
  /** Per GB (10^9 bytes, as S3 bills) stored for a month. */
  storageGbMonth: number;
  /** Per 1,000 PUT, COPY, POST and LIST requests. */
  putPer1000: number;
  /** Per 1,000 GET, HEAD and other reads. */
  getPer1000: number;
  /** Per 1,000 DELETE requests (free on S3). */
  deletePer1000: number;
}

/** S3 Standard, US East (N. Virginia), list prices (see docs/dashboard.md for their date). */
export const S3_STANDARD_PRICES: CostPrices = {
  currency: 'USD',
  storageGbMonth: 0.023,
  putPer1000: 0.005,
  getPer1000: 0.0004,
  deletePer1000: 0,
};

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
