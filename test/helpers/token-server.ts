/**
 * A token server for the test registry, as Docker Hub's auth.docker.io works: it signs RS256
 * JWTs (x5c header) that distribution's `auth.token` verifies against a root cert bundle.
 * Anonymous callers get pull on public repositories; repositories under `private/` need the
 * reader's credentials; the pusher may push anywhere.
 */
import { execFileSync } from 'node:child_process';
import { createPrivateKey, createSign, randomUUID, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import { join } from 'node:path';

export const USERS: Record<string, string> = { pusher: 'push-secret', reader: 'read-secret' };
export const SERVICE = 'pullcache-test-registry';
export const ISSUER = 'pullcache-test-issuer';

export interface TokenRequest {
  scope: string | null;
  user: string | null;
  authorization: string | undefined;
}

export class TokenServer {
  readonly requests: TokenRequest[] = [];
  /** What `expires_in` says, seconds. */
  expiresIn = 300;
  /** How long the JWT really lives, seconds (less than expiresIn to test renewal on a 401). */
  actualLifetime: number | undefined;
  private server: Server | undefined;
  url = '';

  constructor(
    readonly certPath: string,
    private readonly keyPem: string,
    private readonly certDer: string,
  ) {}

  static async start(dir: string): Promise<TokenServer> {
    const key = join(dir, 'token.key');
    const cert = join(dir, 'token.crt');
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        key,
        '-out',
        cert,
        '-days',
        '2',
        '-subj',
        '/CN=pullcache-test-token',
      ],
      { stdio: 'ignore' },
    );
    const pem = readFileSync(cert, 'utf8');
    const der = new X509Certificate(pem).raw.toString('base64');
    const ts = new TokenServer(cert, readFileSync(key, 'utf8'), der);
    ts.server = createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      const user = authenticate(req);
      const scope = url.searchParams.get('scope');
      ts.requests.push({
        scope,
        user: user === false ? null : user,
        authorization: req.headers.authorization,
      });
      if (user === false) {
        res
          .writeHead(401, { 'content-type': 'application/json' })
          .end('{"details":"bad credentials"}');
        return;
      }
      const token = ts.sign(user, scope);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(
        JSON.stringify({
          token,
          access_token: token,
          expires_in: ts.expiresIn,
          issued_at: new Date().toISOString(),
        }),
      );
    });
    await new Promise<void>((resolve) => ts.server!.listen(0, '127.0.0.1', resolve));
    const address = ts.server.address();
    ts.url = `http://127.0.0.1:${typeof address === 'object' && address ? address.port : 0}/token`;
    return ts;
  }

  /** Token requests for a scope (or all). */
  count(scope?: string): number {
    return this.requests.filter((r) => scope === undefined || r.scope === scope).length;
  }

  sign(user: string | null, scope: string | null): string {
    const now = Math.floor(Date.now() / 1000);
    const access = [];
    for (const part of (scope ?? '').split(' ').filter(Boolean)) {
      const [type, name, actions] = part.split(':');
      if (type !== 'repository' || !name) continue;
      const granted = (actions ?? '').split(',').filter((action) => {
        if (user === 'pusher') return true;
        if (action !== 'pull') return false;
        return !name.startsWith('private/') || user === 'reader';
      });
      access.push({ type, name, actions: granted });
    }
    const header = { alg: 'RS256', typ: 'JWT', x5c: [this.certDer] };
    const claims = {
      iss: ISSUER,
      sub: user ?? '',
      aud: SERVICE,
      exp: now + (this.actualLifetime ?? this.expiresIn),
      nbf: now - 10,
      iat: now,
      jti: randomUUID(),
      access,
    };
    const input = `${b64(JSON.stringify(header))}.${b64(JSON.stringify(claims))}`;
    const signature = createSign('RSA-SHA256').update(input).sign(createPrivateKey(this.keyPem));
    return `${input}.${signature.toString('base64url')}`;
  }

  /** A token with pull, push and delete on a repository, for seeding and moving things upstream. */
  pushToken(repository: string): string {
    return this.sign('pusher', `repository:${repository}:pull,push,delete`);
  }

  async close(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()) ?? resolve());
  }
}

function b64(s: string): string {
  return Buffer.from(s).toString('base64url');
}

/** null for anonymous, the user name, or false for wrong credentials. */
function authenticate(req: IncomingMessage): string | null | false {
  const auth = req.headers.authorization;
  if (!auth) return null;
  const m = /^Basic (.+)$/.exec(auth);
  if (!m) return false;
  const [user, password] = Buffer.from(m[1]!, 'base64').toString().split(':');
  return user && USERS[user] === password ? user : false;
}
