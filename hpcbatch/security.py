"""Secrets and transport security: TLS for Dask clusters, database URLs with passwords.

Owns:

- :func:`cluster_security`: the ``distributed.security.Security`` for a run from the
  ``cluster`` settings (``tls: true`` -> throwaway certificates made in memory by
  ``Security.temporary()``; ``tls-ca-file``/``tls-cert``/``tls-key`` -> the user's own
  files, checked before anything starts), or ``None`` for plain TCP;
- :func:`mask_url`: a database URL safe to print (password -> ``***``);
- :func:`database_url`: the database URL from a flag, else ``$HPCBATCH_DB_URL``, with
  the password optionally read from a file that only its owner can read
  (``$HPCBATCH_DB_PASSWORD_FILE``, the ``~/.pgpass`` rule: mode 0600 or stricter).

Does not own opening clusters (:mod:`hpcbatch.cluster` passes the ``Security`` on) or
engines (the workloads make them); it never logs a password.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

DB_URL_ENV = "HPCBATCH_DB_URL"
DB_PASSWORD_FILE_ENV = "HPCBATCH_DB_PASSWORD_FILE"
TLS_FILE_KEYS = ("tls-ca-file", "tls-cert", "tls-key")

_USERINFO = re.compile(r"(://[^:/@\s]+):[^@\s]*@")


# ---------------------------------------------------------------- URLs -----------


def mask_url(url: Any) -> str:
    """``url`` with its password replaced by ``***`` (SQLAlchemy's own masking).

    Anything SQLAlchemy cannot parse is masked by pattern (``scheme://user:pass@``), so a
    malformed URL in an error message does not leak either.
    """
    text = str(url)
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (any parse failure: fall back to the pattern)
        return _USERINFO.sub(r"\1:***@", text)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with every URL password and each given secret replaced by ``***``."""
    out = _USERINFO.sub(r"\1:***@", str(text))
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


def url_password(url: str) -> str | None:
    """The password in a SQLAlchemy URL, or None (for scrubbing logs/outputs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:  # noqa: BLE001
        return None


def read_secret_file(path: str | os.PathLike, what: str = "password file") -> str:
    """The first line of a secret file that only its owner may read (like ``~/.pgpass``).

    Refused, with the ``chmod`` that fixes it, when group or others have any access.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist: check the path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {p} is not a regular file: give the file holding the secret")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{what} {p} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run 'chmod 600 {p}'"
        )
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror}") from None
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ConfigError(f"{what} {p} is empty: put the password on its first line")
    return secret


def database_url(
    url: str | None,
    *,
    default: str | None = None,
    password_file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """The database URL to use: ``url``, else ``$HPCBATCH_DB_URL``, else ``default``.

    A password file (``password_file`` or ``$HPCBATCH_DB_PASSWORD_FILE``) fills in the
    password of a URL that has none; if the file holds a whole URL (``scheme://...``)
    that URL is used.  Passwords typed on the command line show in ``ps`` and shell
    history: prefer the variable or the file.
    """
    env = os.environ if env is None else env
    chosen = url or env.get(DB_URL_ENV)
    secret_path = password_file or env.get(DB_PASSWORD_FILE_ENV)
    if secret_path:
        secret = read_secret_file(secret_path)
        if "://" in secret:
            chosen = chosen or secret
        elif chosen or default:
            chosen = _with_password(chosen or default, secret)
    return chosen or default


def _with_password(url: str, password: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        raise ConfigError(
            f"database URL {mask_url(url)!r} is not a SQLAlchemy URL: e.g. "
            "postgresql+psycopg://USER@HOST:5432/DB"
        ) from None
    if parsed.password or parsed.get_backend_name() == "sqlite":
        return url
    if not parsed.username:
        raise ConfigError(
            f"database URL {mask_url(url)} names no user for the password file: "
            "write it as postgresql+psycopg://USER@HOST/DB"
        )
    return parsed.set(password=password).render_as_string(hide_password=False)


# ---------------------------------------------------------------- TLS ------------


def tls_enabled(settings: Mapping[str, Any] | None) -> bool:
    """Whether the ``cluster`` settings ask for TLS (``tls: true`` or certificate files)."""
    cluster = dict((settings or {}).get("cluster") or {})
    return bool(cluster.get("tls")) or any(cluster.get(k) for k in TLS_FILE_KEYS)


def _check_readable(key: str, value: Any) -> str:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"cluster.{key} {str(path)!r} does not exist or is not a file: give a PEM file "
            "or remove the setting to use temporary certificates with --tls"
        )
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise ConfigError(f"cluster.{key} {path} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN" not in head:
        raise ConfigError(f"cluster.{key} {path} is not a PEM file (no '-----BEGIN' line)")
    return str(path)


def cluster_security(settings: Mapping[str, Any] | None):
    """``distributed.security.Security`` for the run, or None for plain TCP.

    ``cluster.tls: true`` without files: ``Security.temporary()`` (a fresh CA and one
    certificate used by scheduler, workers and client; nothing touches the disk
    except dask-jobqueue writing the worker's copy, mode 0600, for SLURM jobs).  With
    ``tls-ca-file``, ``tls-cert`` and ``tls-key`` (all three): those files for every
    role.  Encryption is required either way, so a plain ``tcp://`` peer is refused.
    """
    cluster = dict((settings or {}).get("cluster") or {})
    files = {k: cluster.get(k) for k in TLS_FILE_KEYS}
    given = {k: v for k, v in files.items() if v}
    if given:
        missing = [k for k in TLS_FILE_KEYS if k not in given]
        if missing:
            raise ConfigError(
                "TLS certificate files need all of cluster.tls-ca-file, cluster.tls-cert and "
                f"cluster.tls-key; missing {', '.join('cluster.' + k for k in missing)}"
            )
        ca, cert, key = (_check_readable(k, given[k]) for k in TLS_FILE_KEYS)
        from distributed.security import Security

        return Security(
            require_encryption=True,
            tls_ca_file=ca,
            tls_client_cert=cert,
            tls_client_key=key,
            tls_scheduler_cert=cert,
            tls_scheduler_key=key,
            tls_worker_cert=cert,
            tls_worker_key=key,
        )
    if not cluster.get("tls"):
        return None
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:
        raise ConfigError(
            "--tls with temporary certificates needs the 'cryptography' package: "
            "pip install cryptography, or give cluster.tls-ca-file/tls-cert/tls-key"
        ) from None


# ------------------------------------------------------------ model files ---------


def load_weights(path: str | os.PathLike, *, what: str = "model file", fix: str = "", **kw: Any):
    """``torch.load(path, weights_only=True)``; a refused or corrupt file is a DataError.

    Only tensors and plain containers are unpickled: a file that would run code on load
    (a crafted pickle) is refused and its payload never runs.  ``fix`` ends the message
    (e.g. ``refit with 'hpcbatch predictive fit DIR'``).
    """
    import torch

    from .errors import DataError

    kw.setdefault("map_location", "cpu")
    suffix = f": {fix}" if fix else ""
    try:
        return torch.load(path, weights_only=True, **kw)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist{suffix}") from None
    except Exception as exc:  # noqa: BLE001 (torch raises many types for bad files)
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise DataError(
                f"{what} {path} holds more than tensors (refused by torch.load "
                f"weights_only=True; it may be a crafted pickle){suffix}"
            ) from None
        raise DataError(f"{what} {path} is corrupt or not a torch file{suffix}") from None


# ------------------------------------------------------------ scratch dirs --------


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory only this user can use (created mode 0700 if missing).

    For files that processes load as code (pickled jobs) under a shared parent such as
    ``/tmp``: a directory owned by someone else, or open to group or others, is refused,
    so nobody else can swap what the workers will unpickle.
    """
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"scratch directory {p} is not a plain directory: remove it")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"scratch directory {p} is owned by another user or open to others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): remove it, or pass another shared_dir"
        )
    return p
