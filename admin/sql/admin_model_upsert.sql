INSERT INTO db_models (id, spec, enabled) VALUES ($1, $2::jsonb, $3)
ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec, enabled = EXCLUDED.enabled, updated_at = now()
