"""The one place where SQLite and PostgreSQL differ: connections, transactions, placeholders, JSON access,
table introspection and the DDL's types (``fleet.store.schema``).

The store's queries are written once, in the SQL both engines take: ``?`` placeholders (``?N`` to reuse an
argument), ``INSERT ... ON CONFLICT``, ``RETURNING``, ``GREATEST``/``LEAST`` and ``IS [NOT] DISTINCT FROM``.
Each backend rewrites that text for its engine once per distinct statement (``translate``): SQLite spells
GREATEST ``max`` and IS DISTINCT FROM ``IS NOT`` (so any SQLite >= 3.35 runs it); PostgreSQL takes ``%s``
placeholders in order. What cannot be rewritten textually is a method: ``json_get`` (a member of a JSON
column), ``bucket`` (a time floored to a step), and for batches ``among`` (a column in a list given as one
argument), ``json_rows`` (a batch's keys as a table, from one JSON argument) and ``insert_many`` (many rows in one
statement on PostgreSQL: ``unnest`` over binary arrays; ``executemany`` on SQLite).

SQLite: one connection (WAL) guarded by a re-entrant lock, which every transaction holds, as the store always
did: paho's thread writes while uvicorn's threads read. PostgreSQL: a psycopg 3 connection pool; transactions
run concurrently, and the database, not the process, serialises what must be (row locks, unique keys), since
several controller processes may share it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.errors import EdgefleetError

# the leader's connection: the server probes it after 5 s idle, every 2 s, 3 times, then ends the session
KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
_CACHE = 4096  # translated statements kept per backend (the IN (?, ?, ...) lists make new ones)
_PLACEHOLDER = re.compile(r"'[^']*'|\?(\d*)|%")
_VALUES = re.compile(r"VALUES \((?:\?, )*\?\)")
_CAST = {"text": str, "bigint": int, "double precision": float}


class Row(tuple):
    """A result row: by position (``r[0]``), by column name (``r["id"]``), ``keys()`` and ``dict(r)``, on both
    engines (sqlite3.Row behaves so; PostgreSQL's rows are made into these)."""

    __slots__ = ()
    _names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_class(names: Sequence[str]) -> type[Row]:
    return type("Row", (Row,), {"__slots__": (), "_names": {n: i for i, n in enumerate(names)}})


class Backend:
    """What the store needs of an engine. ``tx()`` yields a connection-like object whose ``execute(sql, args)``
    returns a cursor (``fetchone``, ``fetchall``, ``rowcount``, iteration) and ``executemany(sql, rows)``;
    ``query`` runs one read outside any write transaction."""

    name = ""
    url = ""
    lock: threading.RLock  # SQLite: held by every transaction; PostgreSQL: only guards in-process caches

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def tx(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    def has_table(self, db: Any, name: str) -> bool:
        raise NotImplementedError

    def json_get(self, column: str, *path: str, text: bool = False) -> str:
        """SQL for the member at ``path`` of the JSON text in ``column`` (NULL if absent): a string member's value
        with ``text``, else the member as JSON text (an object, a list)."""
        raise NotImplementedError

    def bucket(self, expr: str, step: str) -> str:
        """SQL for ``expr`` floored to a multiple of ``step`` (both SQL expressions)."""
        raise NotImplementedError

    def among(self, column: str) -> str:
        """SQL for ``column`` being one of a list given as ONE ``?`` argument (made by ``list_arg``): one
        statement text whatever the list's length, so batches of any size share one prepared statement."""
        raise NotImplementedError

    def list_arg(self, values: Sequence[Any]) -> Any:
        raise NotImplementedError

    def json_rows(self, columns: Sequence[tuple[str, str]]) -> str:
        """SQL for a derived table of rows given as ONE ``?`` argument, a JSON array of objects (``json.dumps``
        of dicts): ``columns`` are (name, SQL type: text, bigint, double precision). A batch's keys joined
        against a table in one statement."""
        raise NotImplementedError

    def insert_many(self, db: Any, sql: str, rows: Sequence[Sequence[Any]], types: Sequence[str]) -> None:
        """Run an ``INSERT ... VALUES (?, ...) [ON CONFLICT ...]`` for every row: SQLite's ``executemany``; on
        PostgreSQL ONE statement over the rows as arrays (``unnest``), as a round trip and a statement per row
        is what bounds a batch there. ``types``: each column's SQL type (text, bigint, double precision); no two
        rows may hit one key of an ON CONFLICT DO UPDATE."""
        db.executemany(sql, rows)

    def try_leader(self, name: str) -> bool:
        """Whether this process holds (or now took) the leadership called ``name``."""
        raise NotImplementedError

    def release_leader(self) -> None:
        raise NotImplementedError

    def exclusive(self, name: str, timeout_s: float = 60.0) -> contextlib.AbstractContextManager[None]:
        """A lock across the processes sharing the database (SQLite: one process, the caller's own lock does)."""
        return contextlib.nullcontext()

    def describe(self) -> str:
        return self.url


# -- SQLite --------------------------------------------------------------------------------------------------
class _Cursor:
    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)


class _Conn:
    """A connection that rewrites the portable SQL for its engine."""

    def __init__(self, raw: Any, translate: Any) -> None:
        self.raw, self._translate = raw, translate

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        text, order = self._translate(sql)
        return _Cursor(self.raw.execute(text, _ordered(args, order)))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        text, order = self._translate(sql)
        cur = self.raw.cursor()
        try:
            cur.executemany(text, rows if order is None else [_ordered(r, order) for r in rows])
        finally:
            cur.close()


def _ordered(args: Sequence[Any], order: list[int] | None) -> Sequence[Any]:
    return tuple(args) if order is None else tuple(args[i] for i in order)


class SQLiteBackend(Backend):
    """One SQLite file in WAL mode."""

    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.lock = threading.RLock()
        self._db: Any = None
        self._sql: dict[str, tuple[str, None]] = {}

    def describe(self) -> str:
        return str(self.path)

    def open(self) -> None:
        import sqlite3

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
        except (sqlite3.DatabaseError, OSError) as e:
            raise EdgefleetError(f"cannot open the fleet database {self.path}: "
                                 f"{e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
        self._db = db

    def close(self) -> None:
        with self.lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> Any:
        if self._db is None:
            raise EdgefleetError("the fleet database is closed")
        return self._db

    def translate(self, sql: str) -> tuple[str, None]:
        out = self._sql.get(sql)
        if out is None:
            text = (sql.replace("GREATEST(", "max(").replace("LEAST(", "min(")
                    .replace("IS NOT DISTINCT FROM", "IS").replace("IS DISTINCT FROM", "IS NOT"))
            if len(self._sql) >= _CACHE:
                self._sql.clear()
            out = self._sql[sql] = (text, None)
        return out

    @contextlib.contextmanager
    def tx(self) -> Iterator[_Conn]:
        """One write transaction (BEGIN IMMEDIATE: the write lock up front), under the lock."""
        with self.lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield _Conn(db, self.translate)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self.lock:
            return self._conn().execute(self.translate(sql)[0], tuple(args)).fetchall()

    def has_table(self, db: Any, name: str) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def json_get(self, column: str, *path: str, text: bool = False) -> str:
        return f"json_extract({column}, '$.{'.'.join(path)}')"

    def bucket(self, expr: str, step: str) -> str:
        return f"CAST({expr} / {step} AS INTEGER) * {step}"

    def among(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def list_arg(self, values: Sequence[Any]) -> Any:
        import json

        return json.dumps(list(values))

    def json_rows(self, columns: Sequence[tuple[str, str]]) -> str:
        cols = ", ".join(f"json_extract(value, '$.{name}') AS {name}" for name, _ in columns)
        return f"(SELECT {cols} FROM json_each(?))"

    def try_leader(self, name: str) -> bool:
        return True  # one process owns a SQLite file

    def release_leader(self) -> None:
        pass


# -- PostgreSQL ---------------------------------------------------------------------------------------------
def translate_pg(sql: str) -> tuple[str, list[int] | None]:
    """``?``/``?N`` placeholders -> psycopg's ``%s`` (with the argument order that fills them); ``%`` escaped;
    string literals left alone."""
    order: list[int] = []
    numbered = False
    n = 0

    def sub(m: re.Match) -> str:
        nonlocal numbered, n
        text = m.group(0)
        if text.startswith("'"):
            return text.replace("%", "%%")
        if text == "%":
            return "%%"
        if m.group(1):
            numbered = True
            order.append(int(m.group(1)) - 1)
        else:
            order.append(n)
            n += 1
        return "%s"

    text = _PLACEHOLDER.sub(sub, sql)
    return text, (order if numbered else None)


def parse_pg_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.hostname and "host=" not in (parts.query or ""):
        raise EdgefleetError(f"invalid store URL {redact(url)!r}: expected postgresql://USER@HOST:PORT/DATABASE")
    if not parts.path.strip("/"):
        raise EdgefleetError(f"invalid store URL {redact(url)!r}: it names no database "
                             f"(postgresql://USER@HOST:PORT/DATABASE)")
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class PostgresBackend(Backend):
    """A PostgreSQL database through a psycopg 3 connection pool (``min_size`` .. ``max_size`` connections)."""

    name = "postgresql"

    def __init__(self, url: str, min_size: int = 1, max_size: int = 8, connect_timeout: float = 10.0) -> None:
        self.url = parse_pg_url(url)
        self.min_size, self.max_size, self.connect_timeout = min_size, max_size, connect_timeout
        self.lock = threading.RLock()
        self._pool: Any = None
        self._leader: Any = None  # the dedicated connection holding advisory locks
        self._leads: set[str] = set()
        self._sql: dict[str, tuple[str, list[int] | None]] = {}

    def describe(self) -> str:
        return redact(self.url)

    def open(self) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise EdgefleetError("a postgresql:// store needs psycopg 3 and psycopg_pool: "
                                 "pip install 'edgefleet[postgresql]'") from None
        # One direct connection first: its error (refused, auth, no such database) is the one worth showing.
        try:
            psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout))).close()
        except psycopg.Error as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1 if "FATAL" not in str(e) else 0]
            raise EdgefleetError(f"cannot connect to the store {redact(self.url)}: {_pg_reason(e) or first}") \
                from None

        def configure(conn: Any) -> None:
            conn.row_factory = _pg_rows
            # No JIT: the fleet aggregate's cost estimate crosses jit_above_cost at 10,000 devices, and compiling
            # it took 3.6 s of a 3.9 s statement here (EXPLAIN ANALYZE); the store's statements are all short.
            # A SET, not a startup option, so that poolers that refuse options (PgBouncer) still work.
            conn.execute("SET jit = off")
            conn.commit()

        # check: a connection the server dropped (a restart, a failover) is replaced before it is handed out,
        # so a restarted PostgreSQL costs no failed transaction
        self._pool = ConnectionPool(self.url, min_size=self.min_size, max_size=self.max_size, open=False,
                                    configure=configure, timeout=max(self.connect_timeout, 30.0),
                                    check=ConnectionPool.check_connection,
                                    kwargs={"connect_timeout": max(1, int(self.connect_timeout))},
                                    name="edgefleet-store")
        self._pool.open(wait=True, timeout=self.connect_timeout)

    def close(self) -> None:
        self.release_leader()
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _require(self) -> Any:
        if self._pool is None:
            raise EdgefleetError("the fleet database is closed")
        return self._pool

    def translate(self, sql: str) -> tuple[str, list[int] | None]:
        out = self._sql.get(sql)
        if out is None:
            if len(self._sql) >= _CACHE:
                self._sql.clear()
            out = self._sql[sql] = translate_pg(sql)
        return out

    @contextlib.contextmanager
    def tx(self) -> Iterator[_Conn]:
        with self._require().connection() as conn:
            with conn.transaction():
                yield _PgConn(conn, self.translate)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        text, order = self.translate(sql)
        with self._require().connection() as conn:
            return conn.execute(text, _ordered(args, order)).fetchall()

    def has_table(self, db: Any, name: str) -> bool:
        return db.execute("SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
                          "AND table_name = ?", (name,)).fetchone() is not None

    def json_get(self, column: str, *path: str, text: bool = False) -> str:
        keys = "{" + ",".join(path) + "}"
        return f"(({column})::jsonb #>> '{keys}')" if text else f"((({column})::jsonb #> '{keys}')::text)"

    def bucket(self, expr: str, step: str) -> str:
        return f"floor(({expr}) / {step}) * {step}"

    def among(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def insert_many(self, db: Any, sql: str, rows: Sequence[Sequence[Any]], types: Sequence[str]) -> None:
        if not rows:
            return
        head, values, tail = _VALUES.split(sql, 1)[0], _VALUES.search(sql), _VALUES.split(sql, 1)[1]
        if values is None or values.group(0).count("?") != len(types):
            raise ValueError(f"insert_many needs one VALUES (?, ...) of {len(types)} columns: {sql[:80]}")
        arrays = ", ".join(f"?::{t}[]" for t in types)
        columns = [[None if v is None else _CAST[t](v) for v in col] for col, t in zip(zip(*rows), types)]
        # binary parameters: psycopg's text format escapes every string of an array with a regex (the payloads'
        # JSON: most of the cost of a batch); the binary format copies them
        text = self.translate(f"{head}SELECT * FROM unnest({arrays}) AS v{tail}")[0].replace("%s", "%b")
        db.raw.execute(text, columns)

    def list_arg(self, values: Sequence[Any]) -> Any:
        return list(values)

    def json_rows(self, columns: Sequence[tuple[str, str]]) -> str:
        cols = ", ".join(f"{name} {kind}" for name, kind in columns)
        return f"(SELECT * FROM jsonb_to_recordset(?::jsonb) AS j({cols}))"

    def try_leader(self, name: str) -> bool:
        """pg_try_advisory_lock on a connection of its own: held until ``release_leader`` or until this process
        (or its connection) dies, when another process's ``try_leader`` takes it. Called again while leading, it
        checks that the connection still answers (``SELECT 1``): when it does not (the server restarted, the
        network is cut) the lead is dropped, as the server has ended (or will end) that session and its lock.
        The server-side TCP keepalives (``KEEPALIVES``) make a server end a partitioned holder's session, and so
        free its lock for another worker, within about ``idle + interval * count`` seconds."""
        import psycopg

        with self.lock:
            if self._leader is not None and not self._leader.closed and name in self._leads:
                try:
                    self._leader.execute("SELECT 1").fetchone()
                    return True
                except psycopg.Error:
                    pass  # the session is gone: so is the lock
            if self._leader is not None and (self._leader.closed or name in self._leads):
                lost = name in self._leads
                with contextlib.suppress(Exception):
                    self._leader.close()
                self._leader, self._leads = None, set()
                if lost:
                    return False  # deposed this round; the next one may take the lock again (on a new session)
            got = None
            if self._leader is not None:  # a follower's connection, kept from an earlier try: it may be gone
                try:
                    got = self._leader.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]
                except psycopg.OperationalError:
                    with contextlib.suppress(Exception):
                        self._leader.close()
                    self._leader = None
            if self._leader is None:
                self._leader = psycopg.connect(self.url, autocommit=True, options=KEEPALIVES,
                                               connect_timeout=max(1, int(self.connect_timeout)))
                got = self._leader.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]
            if got:
                self._leads.add(name)
            return bool(got)

    @contextlib.contextmanager
    def exclusive(self, name: str, timeout_s: float = 60.0) -> Iterator[None]:
        """Hold the advisory lock ``name`` (waiting up to ``timeout_s``) across processes, on a pool connection:
        what one controller process does under it no other does at the same time."""
        with self._require().connection() as conn:
            conn.execute(f"SET lock_timeout = {int(timeout_s * 1000)}")
            conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
            try:
                conn.execute("RESET lock_timeout")
                yield
            finally:
                with contextlib.suppress(Exception):
                    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))

    def release_leader(self) -> None:
        with self.lock:
            if self._leader is not None:
                with contextlib.suppress(Exception):
                    self._leader.execute("SELECT pg_advisory_unlock_all()")  # now, not when the server notices
                with contextlib.suppress(Exception):
                    self._leader.close()
            self._leader, self._leads = None, set()


def _pg_reason(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "FATAL:" in line:
            return line.split("FATAL:", 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "refused" in ln or "timeout" in ln or "could not translate host" in ln:
            return ln.split(": ", 1)[-1] if "failed:" in ln else ln
    return lines[-1] if lines else type(e).__name__


def _pg_rows(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return lambda values: values
    cls = _row_class([c.name for c in desc])
    return lambda values: cls(values)


class _PgConn(_Conn):
    pass


def open_backend(url: str | Path, **opts: Any) -> Backend:
    """``sqlite:///ABS/PATH`` or a plain path -> SQLite; ``postgresql://...`` (or ``postgres://``) -> PostgreSQL.
    Not opened yet."""
    text = str(url)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "":
        return SQLiteBackend(Path(text))
    if scheme == "sqlite":
        path = unquote(urlsplit(text).path)
        if not path or path == "/":
            raise EdgefleetError(f"invalid store URL {text!r}: expected sqlite:///ABSOLUTE/PATH")
        return SQLiteBackend(Path(path))
    if scheme in ("postgresql", "postgres"):
        return PostgresBackend(text, **opts)
    raise EdgefleetError(f"invalid store URL {redact(text)!r}: the scheme must be sqlite:// or postgresql://")
