-- Up Migration
-- The central database: orchestras, their tokens, the audit log and the
-- token-signing keys. Never orchestra data (see schemas/orchestra).

-- Canonical upstream address (PRODUCT.md "upstream identity"): lower-cased
-- host, IPv6 normalised, default port 5432, database name, and the pooler
-- project ref carried in `postgres.<ref>` user names. Computed by the database
-- itself, as a generated column, so rows written behind the control plane's
-- back (an import, a hand-edited row) are still compared.
CREATE FUNCTION stagedoor_canonical_host(h text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
  cleaned text := rtrim(lower(btrim(h)), '.');
BEGIN
  cleaned := regexp_replace(cleaned, '^\[(.*)\]$', '\1');
  BEGIN
    RETURN host(cleaned::inet);
  EXCEPTION WHEN others THEN
    RETURN cleaned;
  END;
END;
$$;

CREATE FUNCTION stagedoor_canonical_address(h text, p integer, d text, u text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN h IS NULL OR d IS NULL THEN NULL ELSE
    CASE WHEN strpos(stagedoor_canonical_host(h), ':') > 0 THEN '[' || stagedoor_canonical_host(h) || ']'
         ELSE stagedoor_canonical_host(h) END || ':' || coalesce(p, 5432)::text || '/' || d ||
    coalesce('#' || lower(substring(u from '^[^.]+\.([A-Za-z0-9]+)$')), '')
  END
$$;

CREATE TABLE orchestras (
  id uuid PRIMARY KEY,
  subdomain text NOT NULL CHECK (subdomain ~ '^[a-z][a-z0-9-]{1,62}$'),
  name text NOT NULL,
  status text NOT NULL CHECK (status IN ('provisioning', 'pending', 'active', 'suspended', 'deleted')),
  source text NOT NULL CHECK (source IN ('provisioned', 'attached', 'pool', 'imported')),
  upstream_host text,
  upstream_port integer,
  upstream_database text,
  upstream_user text,
  upstream_password_enc text,
  upstream_sslmode text NOT NULL DEFAULT 'prefer',
  canonical_address text GENERATED ALWAYS AS
    (stagedoor_canonical_address(upstream_host, upstream_port, upstream_database, upstream_user)) STORED,
  -- system_identifier/oid/name of the physical database, read from the live server
  fingerprint text,
  -- true when stagedoor created the database and role (and so may drop them)
  owns_database boolean NOT NULL DEFAULT false,
  max_connections integer CHECK (max_connections IS NULL OR max_connections > 0),
  legacy_id text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  deleted_at timestamptz
);
CREATE UNIQUE INDEX orchestras_live_subdomain ON orchestras (subdomain) WHERE status <> 'deleted';
CREATE INDEX orchestras_canonical_address ON orchestras (canonical_address) WHERE status <> 'deleted';
CREATE INDEX orchestras_fingerprint ON orchestras (fingerprint) WHERE status <> 'deleted';
CREATE UNIQUE INDEX orchestras_legacy_id ON orchestras (legacy_id) WHERE legacy_id IS NOT NULL;

CREATE TABLE tokens (
  jti uuid PRIMARY KEY,
  orchestra_id uuid NOT NULL REFERENCES orchestras (id) ON DELETE CASCADE,
  name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  revoked_at timestamptz
);
CREATE INDEX tokens_orchestra ON tokens (orchestra_id);

CREATE TABLE audit_log (
  id bigserial PRIMARY KEY,
  at timestamptz NOT NULL DEFAULT now(),
  kind text NOT NULL,
  orchestra_id uuid,
  subdomain text,
  jti text,
  client_address text,
  sqlstate text,
  reason text,
  detail jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_orchestra_at ON audit_log (orchestra_id, at);
CREATE INDEX audit_log_kind_at ON audit_log (kind, at);

CREATE TABLE signing_keys (
  kid text PRIMARY KEY,
  private_jwk_enc text NOT NULL,
  public_jwk jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  retired_at timestamptz
);

-- Pre-made databases (DATABASE_URL_POOL_n), each handed to one orchestra at most.
CREATE TABLE pool_databases (
  pool_key text PRIMARY KEY,
  url_enc text NOT NULL,
  canonical_address text NOT NULL,
  assigned_to uuid REFERENCES orchestras (id) ON DELETE SET NULL,
  assigned_at timestamptz
);

-- Down Migration
DROP TABLE pool_databases;
DROP TABLE signing_keys;
DROP TABLE audit_log;
DROP TABLE tokens;
DROP TABLE orchestras;
DROP FUNCTION stagedoor_canonical_address(text, integer, text, text);
DROP FUNCTION stagedoor_canonical_host(text);
