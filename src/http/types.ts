/** Contracts of the HTTP layer: what a route reaches for an upstream's content. */
import type {
  BlobService,
  ManifestService,
  ReferrersService,
  TagService,
} from '../storage/services.js';

/** The services of one upstream, as the routes use them. */
export interface UpstreamServices {
  blobs: BlobService;
  manifests: ManifestService;
  tags: TagService;
  /** Absent from the storage-only set that export and import use, which serves no requests. */
  referrers?: ReferrersService;
}
