-- Payments of an order that may still change: fetched by reconciliation.
SELECT payment_id FROM payments
WHERE order_id = $1
  AND status NOT IN ('partially_paid', 'finished', 'failed', 'refunded', 'expired')
