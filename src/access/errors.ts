/**
 * The errors of access/, as OCI errors (the one error middleware answers them): 401 for a caller
 * who must log in, 403 for a user without the right, 400 for credentials that cannot be read.
 * The 401's challenge (`WWW-Authenticate`) depends on the request (the token realm is an absolute
 * URL on the host the client dialled): the HTTP layer adds it with AccessControl.challenge.
 */
import { RegistryError } from '../oci/errors.js';

/** 401 UNAUTHORIZED; the HTTP layer adds the challenge. */
export class AuthenticationRequiredError extends RegistryError {
  constructor(message: string) {
    super('UNAUTHORIZED', message);
  }
}

export function malformedCredentials(message: string): RegistryError {
  return new RegistryError('INVALID_REQUEST', message);
}

export function denied(message: string): RegistryError {
  return new RegistryError('DENIED', message);
}
