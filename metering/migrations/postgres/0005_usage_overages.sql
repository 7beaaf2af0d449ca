-- Upstream overages: priced usage an upstream reported beyond the request's hold. The buyer
-- is charged at most the hold; the excess is recorded here, once per request, so the
-- operator sees it (admin overview) without the key ever going below zero.
CREATE TABLE IF NOT EXISTS usage_overages (
    generation_id  text PRIMARY KEY,
    key_id         bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    model          text NOT NULL,
    overage_usd    numeric(38, 12) NOT NULL CHECK (overage_usd > 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS usage_overages_created ON usage_overages (created_at);
