/** The referrers answers kept per repository and subject, one small JSON file each, on a StorageDriver. */
import type { Digest } from '../oci/digest.js';
import { paths } from './paths.js';
import type { ReferrersRecord, ReferrersStore, RepositoryKey, StorageDriver } from './types.js';
import { PathNotFoundError } from './errors.js';

export class DriverReferrersStore implements ReferrersStore {
  constructor(private readonly driver: StorageDriver) {}

  async set(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
    record: ReferrersRecord,
  ): Promise<void> {
    // One file, replaced atomically: the index and the time it was confirmed never disagree.
    await this.driver.putContent(
      paths.referrers(repo, subject, artifactTypes),
      JSON.stringify({
        index: record.index.toString('utf8'),
        filtersApplied: record.filtersApplied,
        confirmedAt: record.confirmedAt,
      }),
    );
  }

  async get(
    repo: RepositoryKey,
    subject: Digest,
    artifactTypes: readonly string[],
  ): Promise<ReferrersRecord | undefined> {
    let json: unknown;
    try {
      const content = await this.driver.getContent(paths.referrers(repo, subject, artifactTypes));
      json = JSON.parse(content.toString('utf8'));
    } catch (err) {
      // Nothing kept, or not a record: either way the upstream is asked.
      if (err instanceof PathNotFoundError || err instanceof SyntaxError) return undefined;
      throw err;
    }
    const record = json as Partial<Record<keyof ReferrersRecord, unknown>> | null;
    if (
      typeof record !== 'object' ||
      record === null ||
      typeof record.index !== 'string' ||
      !Array.isArray(record.filtersApplied) ||
      typeof record.confirmedAt !== 'number'
    )
      return undefined;
    return {
      index: Buffer.from(record.index, 'utf8'),
      filtersApplied: record.filtersApplied.filter((f): f is string => typeof f === 'string'),
      confirmedAt: record.confirmedAt,
    };
  }
}
