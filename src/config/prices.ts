// The object store's prices, as the config's [cost] section sets them, and their defaults:
// S3 Standard list prices for US East (N. Virginia) (docs/dashboard.md says as of when).

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
