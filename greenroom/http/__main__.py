"""`python -m greenroom.http`: an OpenAI-compatible HTTP server for a running node.

Started by `greenroom serve` (settings in the environment), or by hand against any node:
`python -m greenroom.http --node tcp://127.0.0.1:7700 --model DIR --port 8000`.
"""

from __future__ import annotations

import argparse
import os
import sys

from greenroom.http.settings import ENV, HttpSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m greenroom.http", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    p.add_argument("--node", help="the node's frontend address, e.g. tcp://127.0.0.1:7700")
    p.add_argument("--model", help="model directory (tokenizer.json, chat template)")
    p.add_argument("--served-model-name", help="the model name clients use")
    p.add_argument("--chat-template", help="a Jinja chat template file")
    args = p.parse_args(argv)
    if args.node:
        settings = HttpSettings(
            node_address=args.node,
            model_path=args.model,
            served_model_name=args.served_model_name,
            chat_template=args.chat_template,
        )
        os.environ[ENV] = settings.to_env()
    elif not os.environ.get(ENV):
        p.error("--node is required")
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        p.error("--workers > 1 needs PROMETHEUS_MULTIPROC_DIR (an empty folder for the metrics)")
    import uvicorn

    uvicorn.run(
        "greenroom.http.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="auto",  # uvloop when installed
        http="auto",  # httptools when installed
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
