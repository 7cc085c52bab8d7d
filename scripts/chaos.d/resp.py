"""A minimal Redis client (RESP2 over a socket) for the fault suite: one command or a
pipeline, reconnecting on demand, so the suite needs nothing beyond the standard library."""

import socket


class RedisError(Exception):
    """An error reply from the server (`-ERR ...`)."""


class Redis:
    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.addr = (host, port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf = b""

    def _connect(self):
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
            self.buf = b""

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, bytes):
                b = a
            elif isinstance(a, str):
                b = a.encode()
            else:
                b = str(a).encode()
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
        return b"".join(out)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(max(65536, n + 2 - len(self.buf)))
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ConnectionError(f"bad reply {line!r}")

    def pipeline(self, commands):
        """Sends every command, then reads every reply; error replies come back as
        RedisError values, not raised. A broken connection raises (OSError family)."""
        try:
            self._connect()
            self.sock.sendall(b"".join(self._encode(c) for c in commands))
            return [self._reply() for _ in commands]
        except (OSError, ConnectionError):
            self.close()
            raise

    def cmd(self, *args):
        reply = self.pipeline([args])[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply


def text(v):
    """A reply as str (bytes decoded), recursively."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, list):
        return [text(x) for x in v]
    return v


def pairs(flat):
    """A flat [k, v, k, v] reply as a dict of str."""
    flat = text(flat) or []
    return dict(zip(flat[0::2], flat[1::2]))


def entries(reply):
    """An XRANGE reply as [(id, {field: value})] with str values."""
    return [(text(e[0]), pairs(e[1])) for e in (reply or [])]
