SELECT hash FROM admin_password WHERE id = 1
