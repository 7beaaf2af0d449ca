SELECT id, amount_usd, processor, pay_currency, status, credited_usd, payment_id, invoice_id,
       pay_address, pay_amount, pay_extra_id, payment_url, created_at, updated_at, expires_at,
       closed_at
FROM orders WHERE id = $1 AND key_id = $2
