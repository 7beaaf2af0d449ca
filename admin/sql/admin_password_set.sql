INSERT INTO admin_password (id, hash) VALUES (1, $1)
ON CONFLICT (id) DO UPDATE SET hash = EXCLUDED.hash, updated_at = now()
