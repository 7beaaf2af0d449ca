INSERT INTO orders (
    id, key_id, amount_usd, processor, pay_currency, payment_id, invoice_id,
    pay_address, pay_amount, pay_extra_id, payment_url, expires_at, status
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
RETURNING created_at
