DELETE FROM admin_sessions
