"""Llama-family models: config, weights, forward over a paged KV cache."""
