"""A bare gRPC server for bench/stream.py: same transport (grpc.aio, generic handler, raw bytes)
and the same method path as the forecast server, but it answers every message with a fixed
payload (a real forecast response recorded from the server) and does no work in between.

    python -m bench.echo_server --payload FILE   # prints "port N" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc


def _identity(data: bytes) -> bytes:
    return data


async def serve(payload: bytes) -> None:
    async def stream(requests, context):
        async for _ in requests:
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "forecast.v1.Forecaster",
        {"StreamForecast": grpc.stream_stream_rpc_method_handler(stream, _identity, _identity)},
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--payload", required=True)
    args = p.parse_args()
    with open(args.payload, "rb") as f:
        payload = f.read()
    asyncio.run(serve(payload))


if __name__ == "__main__":
    main()
