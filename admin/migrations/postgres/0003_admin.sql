-- The admin panel: its password, sessions and audit trail, and the models and providers it
-- manages, stored on top of the TOML catalog.

-- One row: the admin password as "scrypt$n$r$p$salt$hash" (base64 salt and hash).
CREATE TABLE admin_password (
    id          smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    hash        text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Server-side sessions. Only SHA-256 of the session token is stored; deleting a row revokes
-- the session. No IP and no user agent are kept.
CREATE TABLE admin_sessions (
    id            bigserial PRIMARY KEY,
    token_hash    bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL           -- the absolute limit
);
CREATE INDEX admin_sessions_expiry ON admin_sessions (expires_at);

-- Every admin action. `detail` never holds a credential or a key.
CREATE TABLE admin_audit (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    session_id  bigint,                          -- NULL: the CLI or an anonymous attempt
    action      text NOT NULL,
    target      text NOT NULL DEFAULT '',
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX admin_audit_at ON admin_audit (at DESC, id DESC);

-- Models managed in the panel. `spec` has the fields of a [[models]] TOML table (prices as
-- decimal strings). A row replaces the TOML model of the same id; a disabled row hides it.
CREATE TABLE db_models (
    id          text PRIMARY KEY,
    spec        jsonb NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Providers managed in the panel; a row replaces the TOML provider of the same name.
-- The upstream API key is AES-GCM encrypted under key-ring entry `api_key_kid`.
CREATE TABLE db_providers (
    name                text PRIMARY KEY,
    type                text NOT NULL,
    base_url            text NOT NULL DEFAULT '',
    options             jsonb NOT NULL DEFAULT '{}',   -- timeouts, api_key_env, plugin options
    api_key_ciphertext  bytea,
    api_key_nonce       bytea,
    api_key_kid         text,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Bumped by every change to the two tables above; routers poll it and are told by NOTIFY.
CREATE TABLE catalog_version (
    id       smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version  bigint NOT NULL
);
INSERT INTO catalog_version (id, version) VALUES (1, 0);

CREATE FUNCTION apifast_catalog_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v bigint;
BEGIN
    UPDATE catalog_version SET version = version + 1 WHERE id = 1 RETURNING version INTO v;
    PERFORM pg_notify('apifast_catalog', v::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER db_models_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON db_models
    FOR EACH STATEMENT EXECUTE FUNCTION apifast_catalog_changed();
CREATE TRIGGER db_providers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON db_providers
    FOR EACH STATEMENT EXECUTE FUNCTION apifast_catalog_changed();

-- The overview's revenue chart reads credits by time; usage rows (the bulk) are left out.
CREATE INDEX ledger_credits_time ON ledger (created_at) WHERE kind <> 'usage';
-- The orders page filters by creation time.
CREATE INDEX orders_created ON orders (created_at DESC);
