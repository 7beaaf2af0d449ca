-- Routers serve requests from balance leases without reading the key (router/leases.py):
-- tell them at once when a key changes in a way a lease must not outlive. Disabled,
-- deleted, limits changed, or debited by hand (the balance falls and nothing was spent;
-- the meter's debits also raise spent_usd and say nothing). The WHEN clause keeps the
-- many updates of holds from calling the function at all.
CREATE OR REPLACE FUNCTION apifast_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('apifast_keys', OLD.id::text);
        RETURN OLD;
    END IF;
    PERFORM pg_notify('apifast_keys', NEW.id::text);
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys FOR EACH ROW
WHEN (
    NEW.disabled IS DISTINCT FROM OLD.disabled
    OR NEW.rpm_limit IS DISTINCT FROM OLD.rpm_limit
    OR NEW.tpm_limit IS DISTINCT FROM OLD.tpm_limit
    OR (NEW.balance_usd < OLD.balance_usd AND NEW.spent_usd = OLD.spent_usd)
)
EXECUTE FUNCTION apifast_key_changed();

DROP TRIGGER IF EXISTS api_keys_deleted ON api_keys;
CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys FOR EACH ROW
EXECUTE FUNCTION apifast_key_changed();
