-- active_keys_hourly periods whose distinct keys differ from the raw events' (uniqCombined is
-- mergeable: the states of any split of a set merge to the state of the whole set).
SELECT period, raw.keys AS raw_keys, r.keys AS rollup_keys
FROM (
    SELECT toDateTime(toStartOfHour(ts), 'UTC') AS period, uniqCombined(12)(key_hash) AS keys
    FROM usage_events
    WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
      AND toDateTime(toStartOfHour(ts), 'UTC') IN {periods:Array(DateTime('UTC'))}
    GROUP BY period
) AS raw
FULL OUTER JOIN (
    SELECT period, uniqCombinedMerge(12)(keys) AS keys
    FROM active_keys_hourly
    WHERE period IN {periods:Array(DateTime('UTC'))}
    GROUP BY period
) AS r USING (period)
WHERE raw.keys != r.keys
ORDER BY period
