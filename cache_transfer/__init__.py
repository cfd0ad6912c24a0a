"""KV-cache movement between prefill and decode ranks. Not built yet."""
