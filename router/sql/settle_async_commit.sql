-- A settle batch commits without waiting for its WAL flush: losing one to a Postgres crash
-- loses nothing, since the meter's debit releases the whole hold anyway.
SELECT set_config('synchronous_commit', 'off', true)
