-- Order retention (APIFAST_ORDER_RETENTION_DAYS): closed orders past the cutoff are deleted
-- with their payments and history; this index finds them.
CREATE INDEX IF NOT EXISTS orders_closed ON orders (closed_at) WHERE closed_at IS NOT NULL;
