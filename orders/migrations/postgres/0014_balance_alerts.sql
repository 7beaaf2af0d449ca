-- Low-balance alerts for key holders who left an email (POST /v1/key/alerts). The address
-- is kept only AES-GCM encrypted (the key ring of orders/email_keys.py), bound to its key's
-- row. An alert is sent at most once per crossing: the sweep (orders/balance_alerts.py)
-- sends it when the balance is at or below the threshold and disarms it in the same
-- statement; the trigger below arms it again when a credit lifts the balance above.
CREATE TABLE balance_alerts (
    key_id            bigint PRIMARY KEY REFERENCES api_keys (id) ON DELETE CASCADE,
    threshold_usd     numeric(30, 12) NOT NULL CHECK (threshold_usd > 0),
    email_ciphertext  bytea NOT NULL,
    nonce             bytea NOT NULL,
    enc_key_id        text NOT NULL,
    armed             boolean NOT NULL DEFAULT true,
    sent_at           timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX balance_alerts_armed ON balance_alerts (key_id) WHERE armed;

-- Only a rising balance calls it (credits; the meter's debits lower it), one row by key.
CREATE FUNCTION apifast_rearm_balance_alert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE balance_alerts SET armed = true
    WHERE key_id = NEW.id AND NOT armed AND NEW.balance_usd > threshold_usd;
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_keys_balance_rose AFTER UPDATE OF balance_usd ON api_keys FOR EACH ROW
WHEN (NEW.balance_usd > OLD.balance_usd)
EXECUTE FUNCTION apifast_rearm_balance_alert();
