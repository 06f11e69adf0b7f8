"""greenroom: an LLM inference serving runtime built as asyncio actors over a ZeroMQ bus."""

__version__ = "0.1.0"
