SELECT id, spec, enabled, updated_at FROM db_models ORDER BY id
