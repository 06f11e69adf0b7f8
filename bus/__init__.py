"""The bus: message schema, msgspec codec, ZeroMQ transport."""
