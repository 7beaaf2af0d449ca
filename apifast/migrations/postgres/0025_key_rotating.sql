-- A rotation claims its key by disabling it (orders/sql/rotate_key_claim.sql) and, should it
-- give up (409: holds still in flight), enables it again. `rotating` marks that disable as
-- the rotation's own: any other change of `disabled` (an operator's, in the admin panel)
-- clears it, so a rotation that gives up never re-enables a key someone else disabled.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rotating boolean NOT NULL DEFAULT false;
