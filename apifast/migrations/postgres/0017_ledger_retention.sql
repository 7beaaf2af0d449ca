-- Ledger retention (APIFAST_ORDER_RETENTION_DAYS): the rows before the cutoff are summed per
-- key into one `carried_forward` row (ref "carried_forward:<key id>") and deleted; this index
-- finds them without reading the whole ledger.
CREATE INDEX IF NOT EXISTS ledger_created ON ledger (created_at);
