import type { Digest } from './digest.js';

/** An OCI content descriptor (https://github.com/opencontainers/image-spec/blob/main/descriptor.md). */
export interface Descriptor {
  digest: Digest;
  size: number;
  mediaType?: string;
}

export interface Platform {
  architecture: string;
  os: string;
  variant?: string;
  'os.version'?: string;
}

/** A descriptor in an index, which may name the platform of the manifest it points to. */
export interface IndexDescriptor extends Descriptor {
  platform?: Platform;
  annotations?: Record<string, string>;
}
