// A real OpenID Connect provider (npm `oidc-provider`, OpenID-certified) on 127.0.0.1, for
// the issuer role's tests and local runs. Started by deploy/local/oidc_provider.py.
//
//   node provider.js --port 19950 [--client-id votes-issuer] [--client-secret S] [--key-alg ES256]
//
// - The signing key is generated at start (ES256 by default, or RS256), so a restart is a key
//   rotation: ID tokens signed before it carry a kid the new JWKS no longer has.
// - Static clients: `--client-id` (the audience the issuer expects) and `other-client` (an ID
//   token for it has the wrong audience), both client_secret_basic with the given secret.
// - Real logins: the authorization-code flow with the provider's development interactions
//   (any login name is accepted as the subject; tests drive it with httpx).
// - Non-interactive: a test-only grant `urn:votes:test:id-token` at the token endpoint, which
//   authenticates the client like any grant and returns a real ID token signed with the
//   provider's key for `subject`, optionally expiring `expires_in_s` from now (may be
//   negative: an expired token). Refused unless --test-grant is given.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const TEST_GRANT = 'urn:votes:test:id-token';
const SUBJECT_CHARS_MAX = 255;
const EXPIRES_IN_S_MAX = 86400;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '19950' },
    'client-id': { type: 'string', default: 'votes-issuer' },
    'client-secret': { type: 'string', default: 'local-client-secret' },
    'key-alg': { type: 'string', default: 'ES256' },
    'test-grant': { type: 'boolean', default: false },
  },
});
const port = Number(args.port);
const issuer = `http://127.0.0.1:${port}`;

function signingKey(alg) {
  const kid = randomUUID();
  if (alg === 'ES256') {
    const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
    return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
  }
  if (alg === 'RS256') {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
  }
  throw new Error(`--key-alg must be ES256 or RS256, not ${alg}`);
}

const key = signingKey(args['key-alg']);
const grantTypes = ['authorization_code', ...(args['test-grant'] ? [TEST_GRANT] : [])];
const client = (clientId) => ({
  client_id: clientId,
  client_secret: args['client-secret'],
  grant_types: grantTypes,
  response_types: ['code'],
  redirect_uris: [`${issuer}/callback`],
  token_endpoint_auth_method: 'client_secret_basic',
  id_token_signed_response_alg: key.alg,
});

const provider = new Provider(issuer, {
  clients: [client(args['client-id']), client('other-client')],
  jwks: { keys: [key] },
  // Any login name is an account whose subject is that name (development interactions).
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  pkce: { required: () => false },
  features: { devInteractions: { enabled: true } },
  ttl: { IdToken: 600 },
});

if (args['test-grant']) {
  provider.registerGrantType(TEST_GRANT, async (ctx) => {
    const { subject, expires_in_s: expiresInText } = ctx.oidc.params;
    if (!subject || subject.length > SUBJECT_CHARS_MAX) {
      ctx.status = 400;
      ctx.body = { error: 'invalid_request', error_description: 'subject is required' };
      return;
    }
    const expiresInS = expiresInText === undefined ? 600 : Number(expiresInText);
    if (!Number.isInteger(expiresInS) || expiresInS === 0 || Math.abs(expiresInS) > EXPIRES_IN_S_MAX) {
      ctx.status = 400;
      ctx.body = { error: 'invalid_request', error_description: 'expires_in_s is bad' };
      return;
    }
    const idToken = new provider.IdToken({ sub: subject }, { ctx });
    idToken.scope = 'openid';
    const nowS = Math.floor(Date.now() / 1000);
    if (expiresInS <= 0) idToken.set('iat', nowS + expiresInS - 60);
    const token = await idToken.issue({ use: 'idtoken', expiresAt: nowS + expiresInS });
    ctx.body = { id_token: token, token_type: 'N_A' };
  }, ['subject', 'expires_in_s']);
}

provider.listen(port, '127.0.0.1', () => {
  console.log(JSON.stringify({ listening: issuer, kid: key.kid, alg: key.alg }));
});
