-- Ask every router to give back its balance leases on a key now (router/leases.py listens
-- on apifast_keys, as for a key disabled or debited by hand). $1 key id.
SELECT pg_notify('apifast_keys', $1::bigint::text)
