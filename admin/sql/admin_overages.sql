-- Upstream overages in a window: requests whose reported usage went beyond their hold
-- (not charged to the buyer). $1 start, $2 end.
SELECT count(*) AS requests, coalesce(sum(overage_usd), 0) AS overage_usd
FROM usage_overages
WHERE created_at >= $1 AND created_at < $2
