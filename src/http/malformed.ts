/**
 * What a client whose bytes Node's HTTP parser refuses is answered (a request line and headers
 * over MAX_HEADER_BYTES, a raw byte a URL may not hold, a header without its colon, conflicting
 * lengths, an unknown method, a request that never came whole), and a CONNECT: the same OCI error
 * JSON as every other refusal, not Node's bare status line, and no silently dropped connection.
 * These requests never reach express or the manifest fast path, so the one error renderer
 * (errors.ts) cannot answer them: the answer is written on the socket here, then it closes.
 */
import { STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Logger } from '../log/logger.js';
import { InvalidRequestError, MethodNotAllowedError, type RegistryError } from '../oci/errors.js';
import { sendError } from './errors.js';
import {
  API_SECURITY_HEADERS,
  API_VERSION,
  API_VERSION_HEADER,
  setApiHeaders,
} from './manifests.js';

/**
 * The request line and headers a client may send: Node's default of 16 KiB is too little for a
 * Range of the 1024 pieces containers/image asks for at once (about 23 KiB, with its token).
 */
export const MAX_HEADER_BYTES = 64 * 1024;

/** The server's `clientError` listener: answers when the connection can still take one. */
export function answerMalformed(log: Logger) {
  return (err: NodeJS.ErrnoException, socket: Duplex): void => {
    // Mid-answer (a pipelined request after it was malformed) or gone: nothing can be written
    // without corrupting what is under way; Node's own rule.
    const inFlight = (socket as { _httpMessage?: { headersSent?: boolean } })._httpMessage;
    if (err.code === 'ECONNRESET' || !socket.writable || inFlight?.headersSent) {
      socket.destroy();
      return;
    }
    log.debug(
      {
        reason: err.code ?? err.message,
        client: (socket as { remoteAddress?: string }).remoteAddress,
      },
      'malformed request refused',
    );
    writeAndClose(socket, refusalOf(err));
  };
}

/** The server's `connect` listener: pullcache is no forward proxy, and dials nothing asked. */
export function refuseConnect(_req: IncomingMessage, socket: Duplex): void {
  writeAndClose(
    socket,
    new MethodNotAllowedError(['GET', 'HEAD'], 'CONNECT is not supported: pullcache is no proxy'),
  );
}

/** The server's `checkExpectation` listener: an Expect other than 100-continue (417). */
export function refuseExpectation(log: Logger) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    setApiHeaders(res);
    sendError(
      new InvalidRequestError('Expect: only 100-continue is supported', 417),
      req,
      res,
      log,
    );
  };
}

function refusalOf(err: NodeJS.ErrnoException): RegistryError {
  switch (err.code) {
    case 'HPE_HEADER_OVERFLOW':
      return new InvalidRequestError(
        `the request line and headers are over ${MAX_HEADER_BYTES / 1024} KiB`,
        431,
      );
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return new InvalidRequestError('the request did not come whole in time', 408);
    default:
      return new InvalidRequestError(
        `malformed HTTP request (${err.code ?? 'unparsable'}): not an HTTP/1.1 request this server can read`,
      );
  }
}

function writeAndClose(socket: Duplex, error: RegistryError): void {
  const body = JSON.stringify(error.toBody());
  const headers: Record<string, string | number> = {
    ...error.headers,
    [API_VERSION_HEADER]: API_VERSION,
    ...API_SECURITY_HEADERS,
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    Connection: 'close',
  };
  const head = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`);
  socket.end(
    `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status] ?? ''}\r\n${head.join('')}\r\n${body}`,
  );
}
