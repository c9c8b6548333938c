"""psycopg 3 through tailgres, with the libpq its binary wheel bundles
(17 or later: the encrypted cancel API, PQcancelBlocking and the
non-blocking PQcancelStart/PQcancelPoll). For one sslmode: a query, then
both cancel paths during pg_sleep, each of which must report no error
(libpq reports "SSL error: unexpected eof while reading" when a TLS
connection is closed without close_notify). Prints one JSON line; exits
non-zero on failure.

usage: psycopg_check.py HOST PORT SSLMODE (or "direct": sslnegotiation=direct)
"""
import asyncio
import json
import os
import sys
import threading
import time

import psycopg
from psycopg import errors


def conninfo(host, port, sslmode, app):
    # "direct": TLS from the first byte (sslnegotiation=direct, libpq 17+).
    mode = "sslmode=require sslnegotiation=direct" if sslmode == "direct" else f"sslmode={sslmode}"
    # CHECK_USER / CHECK_PASSWORD (empty: no password, identity login).
    user = os.environ.get("CHECK_USER", "role_scram")
    password = os.environ.get("CHECK_PASSWORD", "scram-pass")
    login = f"user={user} password={password}" if password else f"user={user}"
    # CHECK_OPTIONS: more conninfo settings (e.g. channel_binding=require).
    extra = os.environ.get("CHECK_OPTIONS", "")
    return (f"host={host} port={port} {login} dbname=app "
            f"{mode} application_name={app} connect_timeout=30 {extra}")


def blocking_cancel(host, port, sslmode):
    """Connection.cancel_safe(): PQcancelBlocking."""
    with psycopg.connect(conninfo(host, port, sslmode, f"psycopg-blocking-{sslmode}"), autocommit=True) as conn:
        got = {"ssl_in_use": conn.pgconn.ssl_in_use}
        assert conn.execute("select 41 + 1").fetchone()[0] == 42
        outcome = {}

        def run():
            try:
                conn.execute("select pg_sleep(20)")
                outcome["result"] = "finished"
            except errors.QueryCanceled:
                outcome["result"] = "canceled"
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                outcome["result"] = f"error: {e!r}"

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.0)
        started = time.monotonic()
        conn.cancel_safe(timeout=15)  # raises on any cancel error
        got["cancel_seconds"] = round(time.monotonic() - started, 2)
        t.join(30)
        got["query"] = outcome.get("result", "still running")
        got["after_cancel"] = conn.execute("select 7").fetchone()[0]
        return got


async def nonblocking_cancel(host, port, sslmode):
    """AsyncConnection.cancel_safe(): PQcancelStart + PQcancelPoll."""
    conn = await psycopg.AsyncConnection.connect(
        conninfo(host, port, sslmode, f"psycopg-nonblocking-{sslmode}"), autocommit=True)
    async with conn:
        got = {"ssl_in_use": conn.pgconn.ssl_in_use}
        query = asyncio.create_task(conn.execute("select pg_sleep(20)"))
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await conn.cancel_safe(timeout=15)  # raises on any cancel error
        got["cancel_seconds"] = round(time.monotonic() - started, 2)
        try:
            await asyncio.wait_for(query, 30)
            got["query"] = "finished"
        except errors.QueryCanceled:
            got["query"] = "canceled"
        got["after_cancel"] = (await (await conn.execute("select 7")).fetchone())[0]
        return got


def main(host, port, sslmode):
    out = {"libpq": psycopg.pq.version(), "impl": psycopg.pq.__impl__}
    out["blocking"] = blocking_cancel(host, port, sslmode)
    out["nonblocking"] = asyncio.run(nonblocking_cancel(host, port, sslmode))
    print(json.dumps(out))


main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
