/**
 * The lease protocol between the workers of one host and their primary, over the cluster's IPC
 * channel. Every message carries `pullcache: 'lease'`; a lease is named by a token the worker
 * that asks for it makes (unique on the host: its pid and a counter).
 *
 * worker -> primary: `acquire` for a repository's request (answered by `granted` or `held`, which
 * names the repository the holder fetches for), `watch` (answered by `held` or
 * `none`: a follower only, for a peer's request), and, from a holder, `started`, `progress`,
 * `committing`, `committed`, `failed`; from a follower, `unwatch`, and `takeOver` of the holder it
 * found stalled (answered by `granted`, or by `held` when another follower took it over first).
 * primary -> worker: `granted`, `held` (with what the holder said so far), and `event` to each
 * follower, as the holder tells its progress or fails (or dies: `failed`).
 */
import type { Digest } from '../oci/digest.js';

export type ToPrimary =
  | { pullcache: 'lease'; t: 'acquire'; digest: Digest; token: string; scope: string }
  | {
      pullcache: 'lease';
      t: 'takeOver';
      digest: Digest;
      token: string;
      stalled: string;
      scope: string;
    }
  | { pullcache: 'lease'; t: 'watch'; digest: Digest; token: string }
  | { pullcache: 'lease'; t: 'started'; token: string; upload: string; size: number | null }
  | { pullcache: 'lease'; t: 'progress'; token: string; written: number }
  | { pullcache: 'lease'; t: 'committing'; token: string }
  | { pullcache: 'lease'; t: 'committed'; token: string; size: number; kept: boolean }
  | { pullcache: 'lease'; t: 'failed'; token: string; reason: string }
  | { pullcache: 'lease'; t: 'unwatch'; token: string };

/** What a holder has said so far, as a follower needs it to start. */
export interface HolderState {
  upload: string | null;
  size: number | null;
  written: number;
  /** Every byte written and verified: the holder is committing the blob. */
  committing?: boolean;
}

export type ToWorker =
  | { pullcache: 'lease'; t: 'granted'; token: string }
  | { pullcache: 'lease'; t: 'none'; token: string }
  | {
      pullcache: 'lease';
      t: 'held';
      token: string;
      holder: string;
      /** What the holder fetches for (`upstream/repository`). */
      scope: string;
      state: HolderState;
    }
  | { pullcache: 'lease'; t: 'event'; holder: string; event: WireEvent };

export type WireEvent =
  | { type: 'started'; upload: string; size: number | null }
  | { type: 'progress'; written: number }
  | { type: 'committing' }
  | { type: 'committed'; size: number; kept: boolean }
  | { type: 'failed'; reason: string };

export function isLeaseMessage(message: unknown): message is ToPrimary | ToWorker {
  return (
    typeof message === 'object' &&
    message !== null &&
    (message as { pullcache?: unknown }).pullcache === 'lease'
  );
}
