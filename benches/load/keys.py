#!/usr/bin/env python3
"""Adds N API keys for one user straight into a tollgate SQLite database, in tollgate's key format
(tg_ + 22 base62 + 6 base62 of the CRC32 of what precedes them; only the SHA-256 hex is stored),
and writes the plaintext keys, one per line, for wrk to cycle through.

    python3 benches/load/keys.py DATABASE EMAIL N KEYS_OUT

DATABASE is a SQLite file path, or a postgres:// URL (loaded with psql's \copy).

Used by `bash benches/load.sh keys` (memory with many keys cached). Generating the keys through
`tollgate keys create` would take one process per key.
"""
import csv
import hashlib
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import zlib

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def make_key() -> str:
    body = "tg_" + "".join(secrets.choice(ALPHABET) for _ in range(22))
    crc = zlib.crc32(body.encode())
    check = []
    for _ in range(6):
        check.append(ALPHABET[crc % 62])
        crc //= 62
    return body + "".join(reversed(check))


def rows(user, keys: list):
    """(user_id, name, key_hash, key_prefix) per key: only the SHA-256 hex is stored."""
    return ((user, f"bulk-{i}", hashlib.sha256(k.encode()).hexdigest(), k[:9]) for i, k in enumerate(keys))


# Keys and their user are dated an hour back, like keys that existed before the gateway started:
# tollgate re-reads (and drops from its cache) keys whose row or user changed in the last ~10 s.


def postgres(url: str, email: str, keys: list) -> None:
    def psql(*args: str) -> str:
        return subprocess.run(["psql", url, "-qXAt", *args], check=True, capture_output=True, text=True).stdout.strip()

    then = "now() - interval '1 hour'"
    user = psql("-c", f"UPDATE users SET created_at = {then}, updated_at = {then} "
                      f"WHERE email = '{email}' RETURNING id")
    if not user:
        sys.exit(f"keys.py: no user {email}")
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False, newline="") as f:
        csv.writer(f).writerows(rows(user, keys))
    try:
        psql("-c", f"\\copy api_keys (user_id, name, key_hash, key_prefix) FROM '{f.name}' CSV")
        psql("-c", f"UPDATE api_keys SET created_at = {then}, updated_at = {then} WHERE user_id = {user}")
    finally:
        os.unlink(f.name)


def sqlite(path: str, email: str, keys: list) -> None:
    con = sqlite3.connect(path)
    row = con.execute("SELECT id FROM users WHERE email = ?", (email,)).fetchone()
    if row is None:
        sys.exit(f"keys.py: no user {email} in {path}")
    then = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour')"
    con.execute(f"UPDATE users SET created_at = {then}, updated_at = {then} WHERE id = ?", (row[0],))
    con.executemany(
        "INSERT INTO api_keys (user_id, name, key_hash, key_prefix, created_at, updated_at) "
        f"VALUES (?, ?, ?, ?, {then}, {then})",
        rows(row[0], keys),
    )
    con.commit()


def main() -> None:
    db, email, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    keys = [make_key() for _ in range(n)]
    if db.startswith(("postgres://", "postgresql://")):
        postgres(db, email, keys)
    else:
        sqlite(db, email, keys)
    with open(out, "w") as f:
        f.write("\n".join(keys) + "\n")


if __name__ == "__main__":
    main()
