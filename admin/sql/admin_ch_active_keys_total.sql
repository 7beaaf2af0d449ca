SELECT uniqCombinedMerge(12)(keys) AS active_keys
FROM {table:Identifier}
WHERE period >= {start:DateTime} AND period < {end:DateTime}
