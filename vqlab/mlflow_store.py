"""The one way vqlab opens an MLflow store: ``open_client(uri)`` to write, ``create=False`` to read.

A new SQLite store is made by MLflow on first use: it creates the tables and runs every alembic
migration, which is not safe for two processes at once (the second fails with "table
_alembic_tmp_... already exists" or "duplicate column name"), and a sweep or two commands started
together do exactly that. So a SQLite store is opened under a lock on ``<store>.lock`` beside the
database file (an ``flock``: released when the process ends, however it ends): the first process
creates it, the others wait and then find it made. MLflow keeps the opened store for the rest of
the process, so the lock is taken once per process and store.

Reading (``vqlab.report``, the analysis commands) never creates a store: a local store that is
not there is a ``MissingFileError`` naming its path, before MLflow would make an empty one.
A server (``http://...``) is opened as it is.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from vqlab.errors import MissingFileError


def local_path(uri: str) -> Path | None:
    """The file (SQLite) or folder (file store) of a local store; ``None`` for a server or an
    in-memory database."""
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        return Path(database) if database and database != ":memory:" else None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        return Path(uri)
    return None


def lock_file(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


def open_client(uri: str, create: bool = True):
    """An ``MlflowClient`` on the store ``uri``, its tables made (by this process or another one).
    ``create=False``: a local store that does not exist is an error, and nothing is written."""
    from mlflow import MlflowClient

    path = local_path(uri)
    if path is None:
        return MlflowClient(tracking_uri=uri)
    if not path.exists():
        if not create:
            raise MissingFileError(f"no MLflow store at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
    if not uri.startswith("sqlite:"):
        return MlflowClient(tracking_uri=uri)
    from filelock import FileLock

    with FileLock(lock_file(path)):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store is open (its tables made) before the lock is let go
    return client
