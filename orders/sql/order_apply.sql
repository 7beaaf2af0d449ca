-- $2 the order's status, $3 the amount just credited, $4 whether the status is final,
-- $5 a payment id to remember for reconciliation (kept if one is already known).
UPDATE orders
SET status = $2,
    credited_usd = credited_usd + $3,
    updated_at = now(),
    closed_at = CASE WHEN $4 THEN coalesce(closed_at, now()) ELSE closed_at END,
    payment_id = coalesce(payment_id, $5)
WHERE id = $1
