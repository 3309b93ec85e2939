"""The daemon's control socket: JSON lines over a unix socket.

Each daemon listens on ``<run dir>/ublkb<N>.sock`` (run dir ``/run/ublkmig``,
mode 0700; socket mode 0600; ``$UBLKMIG_RUN_DIR`` overrides the directory).

Protocol: the client sends one JSON object per line, ``{"cmd": "<name>", ...}``;
the daemon answers each with one JSON line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "<one line>"}``.  A connection may carry any number
of requests.  Commands are handlers registered on :class:`ControlServer`
(``server.register("info", handler)``): adding a command is adding one handler.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ublkmig.errors import UblkmigError, UserError
from ublkmig.log import get_logger

if TYPE_CHECKING:  # the server imports anyio when it runs: clients start faster without it
    import anyio.abc

DEFAULT_RUN_DIR = "/run/ublkmig"
ENV_RUN_DIR = "UBLKMIG_RUN_DIR"
MAX_LINE = 1 << 20  # longest request or response line
PROTOCOL_VERSION = 1

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(UblkmigError):
    """The daemon answered {"ok": false, "error": ...}, or a handler refuses a request."""


class DaemonGone(UblkmigError):
    """Nothing listens on the socket (no such daemon, or it died)."""


def run_dir() -> Path:
    return Path(os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR)


def socket_path(dev_id: int) -> Path:
    return run_dir() / f"ublkb{dev_id}.sock"


def ensure_private_dir(d: Path) -> None:
    """Create ``d`` (and parents) and make it root-only (0700)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    """Serves registered command handlers on one unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handlers: dict[str, Handler] = {}
        self.log = get_logger(socket=str(path))

    def register(self, cmd: str, handler: Handler) -> None:
        self.handlers[cmd] = handler

    async def dispatch(self, request: Any) -> dict[str, Any]:
        """One request object -> one response object (never raises)."""
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        cmd = request["cmd"]
        handler = self.handlers.get(cmd)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {known})"}
        args = {k: v for k, v in request.items() if k != "cmd"}
        try:
            result = await handler(args)
        except UblkmigError as e:  # the request cannot be done: say why
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a bug in a handler must not take the daemon down
            self.log.exception("control.handler_failed", cmd=cmd)
            return {"ok": False, "error": f"internal error in {cmd!r}: {e}"}
        return {"ok": True, **result}

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        import anyio
        from anyio.streams.buffered import BufferedByteReceiveStream

        async with stream:
            reader = BufferedByteReceiveStream(stream)
            while True:
                try:
                    line = await reader.receive_until(b"\n", MAX_LINE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                except anyio.DelimiterNotFound:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        await stream.send(encode({"ok": False, "error": "request line too long"}))
                    return
                try:
                    request = json.loads(line)
                except ValueError as e:
                    response: dict[str, Any] = {"ok": False, "error": f"bad JSON: {e}"}
                else:
                    response = await self.dispatch(request)
                try:
                    await stream.send(encode(response))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return

    async def _handle_safely(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await self._handle(stream)
        except Exception:  # a client's mischief must not end the listener
            self.log.exception("control.connection_failed")

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Listen (replacing a stale socket file) until cancelled; removes the socket after.

        Run it with ``await task_group.start(server.serve)``: that returns once it listens.
        """
        import anyio

        ensure_private_dir(self.path.parent)
        listener = await anyio.create_unix_listener(self.path, mode=0o600)
        self.log.debug("control.listening")
        try:
            async with listener:
                task_status.started()
                await listener.serve(self._handle_safely)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def request(path: Path | str, cmd: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command, return the daemon's response (without "ok").

    Raises DaemonGone if nothing listens there, ControlError if the daemon says
    no or the exchange fails, UserError if the socket may not be reached.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonGone(f"no daemon listens on {path}") from e
        except PermissionError:
            raise UserError(f"permission denied on {path}: run as root") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            s.sendall(encode({"cmd": cmd, **args}))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ControlError(f"response from {path} too long")
        except TimeoutError:
            raise ControlError(f"the daemon on {path} did not answer within {timeout} s") from None
        except OSError as e:
            raise ControlError(f"lost the daemon on {path}: {e.strerror or e}") from None
    if not buf:
        raise ControlError(f"the daemon on {path} closed the connection")
    try:
        response = json.loads(buf)
    except ValueError:
        raise ControlError(f"bad response from {path}: {buf[:200]!r}") from None
    if not isinstance(response, dict):
        raise ControlError(f"bad response from {path}: {buf[:200]!r}")
    if not response.pop("ok", False):
        raise ControlError(str(response.get("error", "request failed")))
    return response


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_gone(path: Path, pid: int | None, timeout: float) -> bool:
    """Wait until the daemon that answered on ``path`` (process ``pid``) is gone: its socket
    removed (it does that last, after deleting its device) or the process ended.  False on
    timeout.

    It only looks, never connects: a connection arriving just as the daemon closes its
    listener is what trips anyio's accept race (see daemon._quiet_benign_races).
    """
    deadline = time.monotonic() + timeout
    while path.exists() and (pid is None or _pid_alive(pid)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def sockets() -> list[Path]:
    """The daemons' sockets in the run dir, by device id (UserError if it is not readable)."""
    d = run_dir()
    if not d.is_dir():
        return []
    if not os.access(d, os.R_OK | os.X_OK):
        raise UserError(f"permission denied on {d}: run as root")
    entries = list(d.glob("ublkb*.sock"))

    def dev_id(p: Path) -> int:
        digits = p.name.removeprefix("ublkb").removesuffix(".sock")
        return int(digits) if digits.isdigit() else 1 << 30

    return sorted(entries, key=dev_id)


def list_daemons(timeout: float = 5.0, exclude: Path | None = None) -> list[dict[str, Any]]:
    """``info`` of every daemon of this host (but the one listening on ``exclude``).

    Sockets nobody listens on any more (a daemon that died) are removed; a
    daemon that does not answer gets an entry with ``error``.
    """
    result: list[dict[str, Any]] = []
    for path in sockets():
        if exclude is not None and path == exclude:
            continue
        try:
            info = request(path, "info", timeout=timeout)
        except DaemonGone:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except ControlError as e:
            info = {"socket": str(path), "error": str(e)}
        result.append(info)
    return result
