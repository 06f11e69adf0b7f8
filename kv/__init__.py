"""KV subsystem: block pool, prefix tree, host tier, batch admission."""
