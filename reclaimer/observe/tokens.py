"""Credentials we send or accept: a token from an environment variable, a value, or a mounted file re-read when it
rotates (gateways, the hub, Kubeflow notebook servers, our own listen token). Never logs or repr's a value."""

from __future__ import annotations

import os

import structlog

from reclaimer.core.errors import StartupError

log = structlog.get_logger(__name__)


class TokenError(StartupError):
    """A configured token source is unusable. The message names the source, never the value."""


def _check_token(token: str, where: str, bearer: bool = False) -> str:
    token = token.strip()
    if not token:
        raise TokenError(f"{where} is empty")
    if bearer and (not (token.isascii() and token.isprintable()) or " " in token):
        raise TokenError(f"{where} holds characters a bearer token cannot have")
    if not token.isprintable() or not token.isascii():
        # A newline would let the value inject a second header.
        raise TokenError(f"{where} holds characters that cannot go in an HTTP header")
    return token


def _read_token_file(path: str, where: str, bearer: bool = False) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return _check_token(fh.read(64 * 1024), where, bearer)
    except OSError as exc:
        raise TokenError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise TokenError(f"{where} is not UTF-8 text") from None


def read_bearer_token_file(path: str, where: str) -> str:
    """A token we accept (``listen_token_file``), read once: as a token file, and without spaces."""
    return _read_token_file(path, where, bearer=True)


class TokenSource:
    """A token from an environment variable (fixed for the process's life) or a file (a mounted Secret, a projected
    service-account token), re-read when the file changes.

    ``current()`` stats the file (inode, size, mtime: one syscall) and reads it again only when that changed; a file
    that becomes unreadable or empty keeps the last good token (a Secret update swaps a symlink) and logs once.
    ``reread()`` is the 401 path: read again now, say whether the value changed. ``rejected`` is set (with the
    reason, never the value) when the server refused the token and re-reading did not help; it clears once a request
    with the token is accepted again.
    """

    def __init__(
        self,
        owner: str,
        *,
        env: str | None = None,
        file: str | None = None,
        value: str | None = None,
        where: str | None = None,
        bearer: bool = False,
    ):
        if sum(x is not None for x in (env, file, value)) != 1:
            raise ValueError("a token source is exactly one of env, file or value")
        self.owner = owner
        self.file = file
        self._bearer = bearer  # a token we accept (listen_token_file): no spaces, as `Bearer <token>` splits on them
        self.rejected: str | None = None
        self.rereads = 0  # times the file was read again because it changed or a request was refused
        self._stamp: tuple[int, int, int] | None = None
        self._failing = False
        if env is not None:
            self.where = f"{owner}: environment variable {env}"
            raw = os.environ.get(env)
            if raw is None:
                raise TokenError(f"{self.where} is not set")
            self._token = _check_token(raw, self.where)
        elif file is not None:
            self.where = where or f"{owner}: token file {file}"
            self._stamp = self._stat()
            self._token = _read_token_file(file, self.where, bearer)
        else:
            self.where = f"{owner}: token"
            self._token = _check_token(str(value), self.where)

    @classmethod
    def from_settings(cls, token_env: str | None, token_file: str | None, owner: str) -> TokenSource | None:
        if token_env:
            return cls(owner, env=token_env)
        if token_file:
            return cls(owner, file=token_file)
        return None

    def __repr__(self) -> str:
        return f"TokenSource({self.where!r})"

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> str:
        """The token now (the file is read again when it changed since the last read)."""
        if self.file is not None:
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._load(stamp)
        return self._token

    def reread(self) -> bool:
        """Read the file again now (after a 401); True when the token changed. Always False for env and values."""
        if self.file is None:
            return False
        before = self._token
        self._load(self._stat())
        return self._token != before

    def _load(self, stamp: tuple[int, int, int] | None) -> None:
        assert self.file is not None
        try:
            token = _read_token_file(self.file, self.where, self._bearer)
        except TokenError as exc:
            if not self._failing:
                log.warning("token file unusable; keeping the last good token", owner=self.owner, error=str(exc))
            self._failing = True
            return
        if self._failing:
            log.info("token file usable again", owner=self.owner, file=self.file)
        self._failing = False
        self._stamp = stamp
        if token != self._token:
            self.rereads += 1
            log.info("token file changed; using the new token", owner=self.owner, file=self.file)
        self._token = token

    def accepted(self) -> None:
        if self.rejected is not None:
            log.info("token accepted again", owner=self.owner)
        self.rejected = None

    def refused(self, status: int) -> None:
        reason = f"{self.where} was refused (HTTP {status})" + (
            " and re-reading the file did not help"
            if self.file is not None
            else "; an environment token cannot be re-read: restart with a valid one"
        )
        if self.rejected != reason:
            log.error("credential refused; actions halted until it is accepted", owner=self.owner, reason=reason)
        self.rejected = reason
