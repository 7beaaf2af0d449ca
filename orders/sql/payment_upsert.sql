INSERT INTO payments (processor, payment_id, parent_payment_id, order_id, status, raw_status, credited_usd)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (processor, payment_id) DO UPDATE
SET status = EXCLUDED.status,
    raw_status = EXCLUDED.raw_status,
    credited_usd = EXCLUDED.credited_usd,
    updated_at = now()
