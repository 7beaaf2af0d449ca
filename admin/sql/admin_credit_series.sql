-- Credit added per time bucket ($1 'hour' or 'day') between $2 and $3, by ledger kind.
SELECT date_trunc($1, created_at, 'UTC') AS bucket, kind, sum(amount_usd) AS amount_usd
FROM ledger
WHERE kind <> 'usage' AND created_at >= $2 AND created_at < $3
GROUP BY 1, 2
ORDER BY 1
