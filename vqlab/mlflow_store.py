"""The one way vqlab opens an MLflow store: ``open_client(uri)`` to write, ``create=False`` to read.

A new SQLite store is made by MLflow on first use: it creates the tables and runs every alembic
migration, which is not safe for two processes at once (the second fails with "table
_alembic_tmp_... already exists" or "duplicate column name"), and a sweep or two commands started
together do exactly that. So a writer opens a SQLite store holding an exclusive lock on
``<store>.lock`` beside the database file (``flock``: released when the process ends, however it
ends): the first process creates the store, the others wait and then find it made. A reader holds
a shared lock on that file when it exists (it waits for a store being made) and creates nothing.
MLflow keeps an opened store for the rest of the process, so the tables are made once per store.
Making them runs 68 migrations (9 s on a busy 2-core machine, where opening a made store took 2 s),
so a new store starts as a copy of an empty one that this MLflow version made once
(``store_template``, in the user's cache): MLflow finds its tables made and adds the default
experiment, as it does in any new store.

Reading (``vqlab.report``, the analysis commands) never creates a store: a local store that is not
there is a ``MissingFileError`` naming its path, before MLflow would make an empty one. A server
(``http://...``) is opened as it is.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
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


@contextlib.contextmanager
def locked(path: Path, create: bool) -> Iterator[None]:
    """``create``: hold an exclusive lock on ``path``, made if missing; else a shared lock on it if
    it exists (nothing is created)."""
    if not create and not path.exists():
        yield
        return
    try:
        import fcntl
    except ImportError:  # no flock (Windows): filelock's lock, exclusive either way
        from filelock import FileLock

        with FileLock(path):
            yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if create else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # lets the lock go


def cache_folder() -> Path:
    """Where vqlab keeps what it can remake: ``$XDG_CACHE_HOME/vqlab``, else ``~/.cache/vqlab``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqlab"


def store_template() -> Path | None:
    """An empty SQLite store with every table of the installed MLflow and no experiment, made once
    per MLflow version (atomically: a process that finds it being made makes its own and the last
    rename wins, all of them equal); ``None`` where the cache cannot be written."""
    import sqlite3

    import mlflow
    from mlflow import MlflowClient

    template = cache_folder() / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    making = template.with_name(f"{template.name}.{os.getpid()}.tmp")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        making.unlink(missing_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{making}").search_experiments(max_results=1)
        with contextlib.closing(sqlite3.connect(making)) as db, db:
            db.execute("DELETE FROM experiments")  # the default one, which names the template's folder
        os.replace(making, template)
    except (OSError, sqlite3.Error):
        return None
    finally:
        with contextlib.suppress(OSError):
            making.unlink(missing_ok=True)  # no half-made template left in the cache, whatever failed
    return template


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
    with locked(lock_file(path), create):
        if create and not path.exists() and (template := store_template()) is not None:
            shutil.copyfile(template, path)
        client = MlflowClient(tracking_uri=uri)  # opens the store: makes its tables if it is new
        client.search_experiments(max_results=1)  # (so that it is open before the lock goes, whatever MLflow defers)
    return client
