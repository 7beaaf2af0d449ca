-- Add the keys of the raw events in these periods to active_keys_daily again ({all_keys}, or
-- only those in {keys}). A uniqCombined state is a set, so adding a key twice is harmless.
INSERT INTO active_keys_daily
SELECT toDateTime(toDate(ts), 'UTC') AS period, uniqCombinedState(12)(key_hash) AS keys
FROM usage_events
WHERE ts >= {lo:DateTime64(3, 'UTC')} AND ts < {hi:DateTime64(3, 'UTC')}
  AND toDateTime(toDate(ts), 'UTC') IN {periods:Array(DateTime('UTC'))}
  AND ({all_keys:Bool} OR key_hash IN {keys:Array(String)})
GROUP BY period
