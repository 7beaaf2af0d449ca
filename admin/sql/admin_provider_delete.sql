DELETE FROM db_providers WHERE name = $1 RETURNING name
