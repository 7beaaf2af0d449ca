"""Built-in provider plugins: `openai` (any OpenAI-compatible upstream), `anthropic`
(the Messages API, translated) and `demo` (offline canned replies for trying ApiFast)."""
