"""A TCP proxy between workers and the S3 server that can break connections on demand.

It resets the next N connections it accepts (as a flaky network or an
overloaded endpoint would), caps the bandwidth towards the server, and
otherwise forwards bytes both ways.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from tests.services import free_port


class FlakyProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.resets_left = 0
        self.reset_mid_request = False
        self.resets_done = 0
        self.connections = 0
        #: bytes forwarded towards the server: what the workers actually sent
        self.bytes_up = 0
        #: bytes per second towards the server, shared by all connections (None: unlimited)
        self.rate: float | None = None
        self._sent = 0.0
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        #: cleared by hold(): bytes towards the server wait until release()
        self._flowing = threading.Event()
        self._flowing.set()
        self.up()

    def up(self) -> None:
        """Accept connections (again) on the same port."""
        self._server = socket.create_server(("127.0.0.1", self.port), backlog=64)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def down(self) -> None:
        """The endpoint becomes unreachable: new connections are refused, open ones cut."""
        try:  # wakes the accept() of the other thread, so the port is really released
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            cut, self._open = self._open, set()
        for sock in cut:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def limit(self, bytes_per_second: float | None) -> None:
        with self._lock:
            self.rate, self._sent, self._since = bytes_per_second, 0.0, time.monotonic()

    def hold(self) -> None:
        """Bytes towards the server wait (requests stay in flight, nothing lands) until release()."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def _throttle(self, size: int) -> None:
        """Count bytes towards the server; sleep so that they stay under `rate` on average."""
        while not self._flowing.wait(0.5) and not self._closed:
            pass
        with self._lock:
            self.bytes_up += size
            if self.rate is None:
                return
            now = time.monotonic()
            if self._since + self._sent / self.rate < now - 0.25:  # idle: no burst credit beyond 0.25 s
                self._since, self._sent = now - 0.25, 0.0
            self._sent += size
            due = self._since + self._sent / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def reset_next(self, count: int, mid_request: bool = False) -> None:
        """Reset the next `count` connections: at once, or once the request has begun
        (then the client sees its request cut, not a refused connection)."""
        with self._lock:
            self.resets_left = count
            self.reset_mid_request = mid_request

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        self.down()

    def _accept(self, server: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                reset = self.resets_left > 0
                if reset:
                    self.resets_left -= 1
                    self.resets_done += 1
            if reset:
                if self.reset_mid_request:
                    client.settimeout(5)
                    try:
                        client.recv(1024)
                    except OSError:
                        pass
                # SO_LINGER 0: close() sends RST, as a dropped connection does.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            with self._lock:
                self._open.add(client)
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream, self._throttle)


def _pump(source: socket.socket, target: socket.socket, throttle=None) -> None:  # type: ignore[no-untyped-def]
    try:
        while data := source.recv(64 * 1024):
            if throttle:
                throttle(len(data))
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        source.close()
