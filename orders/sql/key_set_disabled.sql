UPDATE api_keys SET disabled = $2 WHERE id = $1
