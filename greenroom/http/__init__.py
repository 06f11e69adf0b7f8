"""OpenAI-compatible HTTP server: its own processes, speaking to a node through the client.

`launcher.HttpServer` starts the server processes; `app.create_app` is the ASGI application
each process runs; `chat_template` renders chat messages as Hugging Face does.
"""
