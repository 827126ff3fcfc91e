"""The authenticated channel between the head and its agents and remote workers:
multiprocessing.connection over TCP with an HMAC challenge on the shared cluster token, which runs
before any message is read, so no unauthenticated peer ever reaches the unpickler. Every message is
read with a size bound."""

from __future__ import annotations

import os
import pickle
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

MAX_MESSAGE_BYTES = 64 << 20  # a step of thousands of tokens is far below this
TOKEN_ENV = "HEXGEN_CLUSTER_TOKEN"


def load_token(token_file: str | None) -> bytes:
    """The cluster token: from `token_file`, else from $HEXGEN_CLUSTER_TOKEN."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"token file {token_file!r} not found")
        token = path.read_text().strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no cluster token: give --token-file or set {TOKEN_ENV}")
    if len(token) < 16:
        raise ValueError("the cluster token must have at least 16 characters")
    return token.encode()


def listen(host: str, port: int, token: bytes) -> Listener:
    return Listener((host, port), family="AF_INET6" if ":" in host else "AF_INET", authkey=token, backlog=128)


def connect(host: str, port: int, token: bytes) -> Connection:
    """Raises AuthenticationError when the head refuses the token, OSError when it cannot be reached."""
    return Client((host, port), family="AF_INET6" if ":" in host else "AF_INET", authkey=token)


def receive(conn: Connection):
    """One message, at most MAX_MESSAGE_BYTES (an OSError past it)."""
    return pickle.loads(conn.recv_bytes(MAX_MESSAGE_BYTES))


def send(conn: Connection, message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
