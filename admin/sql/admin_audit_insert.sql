INSERT INTO admin_audit (session_id, action, target, detail) VALUES ($1, $2, $3, $4::jsonb)
