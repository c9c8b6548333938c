"""asyncpg through tailgres: TLS login (password relay), a query, a
timeout-triggered cancel (asyncpg sends it over TLS on a new connection),
and close() that returns instead of hanging (the splice must propagate
close). Prints one JSON line with what happened; exits non-zero on failure.

usage: asyncpg_check.py HOST PORT SSL(require|disable)
"""
import asyncio
import json
import os
import sys
import time

import asyncpg


async def main(host, port, ssl):
    out = {}
    conn = await asyncio.wait_for(
        # CHECK_USER / CHECK_PASSWORD (empty: no password, identity login).
        asyncpg.connect(host=host, port=port, user=os.environ.get("CHECK_USER", "role_scram"),
                        password=os.environ.get("CHECK_PASSWORD", "scram-pass") or None,
                        database="app", ssl=ssl, server_settings={"application_name": "asyncpg-check"}),
        30)
    out["answer"] = await conn.fetchval("select $1::int + 1", 41)
    t = time.monotonic()
    try:
        await conn.execute("select pg_sleep(30)", timeout=1)
        out["cancelled"] = False
    except asyncio.TimeoutError:
        out["cancelled"] = True
    out["cancel_seconds"] = round(time.monotonic() - t, 2)
    # The connection is usable after the cancel.
    out["after_cancel"] = await conn.fetchval("select 7")
    t = time.monotonic()
    await asyncio.wait_for(conn.close(), 10)
    out["close_seconds"] = round(time.monotonic() - t, 2)
    print(json.dumps(out))


asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if sys.argv[3] != "disable" else False))
