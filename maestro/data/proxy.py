"""A TCP proxy on 127.0.0.1 that can add latency per request, go down, or hang: for the S3
outage tests and the loader's latency benchmark (`maestro bench data --s3-latency-ms`).

Put in front of an S3 endpoint (a moto server), it forwards bytes both ways. `latency_s` delays
each request a client sends (the first burst after an answer), as a distant object store would;
`down()` closes the listening socket and every open connection (connection refused, resets
mid-read) until `up()` binds the same port again; `hang = True` makes it accept connections and
never answer, as a stalled endpoint does.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Proxy:
    def __init__(self, target_port: int, latency_s: float = 0.0, port: int = 0):
        self.target_port, self.latency_s, self.hang = target_port, latency_s, False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.port = port
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port, self._listener = s.getsockname()[1], s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and break the open ones."""
        s, self._listener = self._listener, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            if self.hang:
                with self._lock:
                    self._conns.add(client)  # held open, never answered
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for c in (client, upstream):
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns |= {client, upstream}
            new_request = threading.Event()  # set: the client's next burst starts a request
            new_request.set()
            threading.Thread(
                target=self._pipe, args=(client, upstream, new_request, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, new_request, False), daemon=True
            ).start()

    def _pipe(
        self, src: socket.socket, dst: socket.socket, new_request: threading.Event, request: bool
    ) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if not request:
                    new_request.set()  # an answer: what the client sends next is another request
                elif new_request.is_set():
                    new_request.clear()
                    if self.latency_s:
                        time.sleep(self.latency_s)  # once per request, not per chunk of its body
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for c in (src, dst):
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
            with self._lock:
                self._conns -= {src, dst}
