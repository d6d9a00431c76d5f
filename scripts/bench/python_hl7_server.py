#!/usr/bin/env python3
"""python-hl7's asyncio MLLP server (https://python-hl7.readthedocs.io), storing nothing:
each message is parsed and answered with its AA acknowledgement, as in python-hl7's own
documentation. The comparison point for examples/ingest_bound.rs (`pip install hl7`).

    python3 scripts/bench/python_hl7_server.py PORT
"""
import asyncio
import sys

import hl7
from hl7.mllp import start_hl7_server


async def process_hl7_messages(hl7_reader, hl7_writer):
    try:
        while not hl7_writer.is_closing():
            message = await hl7_reader.readmessage()
            hl7_writer.writemessage(message.create_ack())
            await hl7_writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        if not hl7_writer.is_closing():
            hl7_writer.close()
            await hl7_writer.wait_closed()


async def main(port):
    async with await start_hl7_server(process_hl7_messages, "127.0.0.1", port) as server:
        print("listening", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
