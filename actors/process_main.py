"""Entry point of an actor process (see process_host.py): `python -m ... STATUS_FD`."""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec

from greenroom.actors.cell import State
from greenroom.actors.loop_thread import new_event_loop
from greenroom.actors.process_host import REF_ARG, ProcessSpec, decode_arg, import_path
from greenroom.heap import freeze_startup_heap
from greenroom.logging import configure_logging, get_logger

log = get_logger(__name__)


def _read_spec() -> ProcessSpec:
    stdin = sys.stdin.buffer
    size = int.from_bytes(stdin.read(8), "little")
    return msgspec.msgpack.decode(stdin.read(size), type=ProcessSpec)


async def _serve(spec: ProcessSpec, status_fd: int) -> int:
    from greenroom.actors.runtime import Runtime

    rt = Runtime()
    loop = asyncio.get_running_loop()
    try:
        args = [await _resolve(rt, a) for a in spec.args]
        kwargs = {k: await _resolve(rt, a) for k, a in spec.kwargs.items()}
        ref = await rt.spawn(
            import_path(spec.factory),
            *args,
            name=spec.name,
            mailbox_size=spec.mailbox_size,
            **kwargs,
        )
        await rt.expose(ref, spec.address)
    except BaseException as exc:  # noqa: B036 - any start failure goes back to the parent
        os.write(status_fd, f"{type(exc).__name__}: {exc}".encode()[:4000])
        await rt.shutdown(timeout=2.0)
        return 3
    os.write(status_fd, b"ok")
    # what start-up left alive (torch, the model, its graphs) is never walked by a collection
    freeze_startup_heap()
    cell = rt.cell(spec.name)
    # Lifeline: EOF on stdin (parent asked us to stop, or died) stops the actor.
    loop.add_reader(0, _on_lifeline, loop, cell)
    await cell.wait_exit()
    loop.remove_reader(0)
    crashed = cell.state is State.CRASHED
    await rt.shutdown(timeout=5.0)
    return 1 if crashed else 0


def _on_lifeline(loop: asyncio.AbstractEventLoop, cell) -> None:
    try:
        data = os.read(0, 4096)
    except OSError:
        data = b""
    if not data:
        loop.remove_reader(0)
        cell.request_stop()


async def _resolve(rt, arg):
    if arg.type_path == REF_ARG:
        return await rt.connect(arg.data.decode())
    return decode_arg(arg)


def main() -> None:
    status_fd = int(sys.argv[1])
    spec = _read_spec()
    for path in reversed(spec.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    stream = sys.stderr if spec.log_stream == "stderr" else sys.stdout
    configure_logging(spec.log_format, spec.log_level, stream=stream)
    loop = new_event_loop()
    try:
        code = loop.run_until_complete(_serve(spec, status_fd))
    finally:
        loop.close()
    os.close(status_fd)
    sys.exit(code)


if __name__ == "__main__":
    main()
