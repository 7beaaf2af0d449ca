-- A given-back lease whose requests are all debited holds nothing: drop its row.
DELETE FROM reservations WHERE generation_id = ANY($1::text[]) AND amount_usd = 0
