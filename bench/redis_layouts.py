#!/usr/bin/env python3
"""Redis's own CPU per operation for session2's record layout and the
alternatives BENCHMARKS.md weighs (see "Reading these numbers").

Talks RESP over a plain socket (no client library) to the Redis at
127.0.0.1:6379, or the host and port given as arguments, and reads Redis's
CPU time (`INFO cpu`) before and after each measurement, so that the
client's own speed does not count. Each operation runs on 16 sessions at a
time, as session2's save batches do. Keys live under `s2layouts:` and are
deleted at the end; nothing else is touched.

Compared, per save:
- `script`: session2's batch save script (`REPLACE_MANY` with its prelude
  and `redis_write.lua`, after `redis_names.lua`) over sessions stored as session2 stores them, one
  string each;
- over the hash layout session2 used before (a field per value): `watch`,
  the compare-and-swap by `WATCH`, `HMGET`, then `MULTI`, `HSET` and
  `EXEC`, and `hmget+hset`, the same reads and writes without any check;
- `packed script` and `packed watch`: a minimal compare-and-swap over one
  string, by a script and by `WATCH`;
- `set`: tower-sessions' blind `SET`.
And per load: `HMGET` of the 10 fields of a hash against `GET` of one string.
"""

import re
import socket
import sys
import time
from pathlib import Path

STORE = Path(__file__).resolve().parent.parent / "session2" / "src" / "store"
PREFIX = "s2layouts:"
BATCH = 16
SESSIONS = BATCH * 64
ROUNDS = 400
DATA = b'{"counter":12345}'


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Connection:
    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _fill(self, size):
        while len(self.buffer) < size:
            self.buffer += self.sock.recv(1 << 20)

    def _line(self):
        while b"\r\n" not in self.buffer:
            self.buffer += self.sock.recv(1 << 20)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body
        if kind == b"-":
            raise RuntimeError(body.decode())
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            self._fill(size + 2)
            value, self.buffer = self.buffer[:size], self.buffer[size + 2 :]
            return value
        if kind == b"*":
            size = int(body)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise RuntimeError("unexpected reply %r" % line)

    def pipeline(self, commands):
        self.sock.sendall(b"".join(encode(*command) for command in commands))
        return [self._reply() for _ in commands]

    def cpu_seconds(self):
        info = self.pipeline([("INFO", "cpu")])[0].decode()
        fields = dict(line.split(":", 1) for line in info.split("\r\n") if ":" in line)
        return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def batch_save_script():
    """session2's batch save script, assembled as `store/redis.rs` does."""
    source = (STORE / "redis.rs").read_text()
    body = re.search(
        r'const REPLACE_MANY: &str = script!\(\s*\["redis_write.lua"\],\s*r"(.*?)"\s*\);',
        source,
        re.S,
    ).group(1)
    parts = ["redis_names.lua", "redis_prelude.lua", "redis_write.lua"]
    return "".join((STORE / part).read_text() for part in parts) + body


PACKED_SAVE = r"""
local out, i = {}, 1
while i <= #ARGV do
  local key, expected, now, record = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local current = redis.call('GET', key)
  local version, expires
  if current then version, expires = string.match(current, '^(%d+)|(%d+)|') end
  if version == expected and tonumber(expires) > now then
    redis.call('SET', key, record)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  i = i + 4
end
return out
"""

CHECKED = ["version", "expires_at", "user", "absolute_deadline", "lease_token", "indexed_expiry", "ttl_at"]
RECORD = ["version", "expires_at", "user", "created_at", "accessed_at", "idle_deadline",
          "absolute_deadline", "lease_token", "lease_until", "data"]


def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 6379
    redis = Connection(host, port)
    now = int(time.time() * 1000)
    far = now + 24 * 3600 * 1000
    # session2's script takes each session's key name.
    sessions = ["%ss:%064x" % (PREFIX, i) for i in range(SESSIONS)]
    hashes = ["%sh:%064x" % (PREFIX, i) for i in range(SESSIONS)]
    strings = ["%sp:%064x" % (PREFIX, i) for i in range(SESSIONS)]
    tower = ["%st:%d" % (PREFIX, i) for i in range(SESSIONS)]
    versions = [1] * SESSIONS
    session2_versions = [1] * SESSIONS
    packed_versions = [1] * SESSIONS

    def packed(version):
        return b"%d|%d|%d|%d|%d|%d|||" % (version, far, far + 1000, now, now, far) + DATA

    def session2_record(version):
        """A session as session2 stores it."""
        head = b"|".join(b"%d" % field for field in (version, far)) + b"||"
        return head + b"|".join([b"", b"", b""] + [b"%d" % t for t in (now, now, far)]) + b"|" + DATA

    redis.pipeline(
        [("HSET", key, "indexed_expiry", far, "ttl_at", far + 1000, "version", 1, "created_at", now,
          "accessed_at", now, "idle_deadline", far, "expires_at", far, "data", DATA) for key in hashes]
        + [("SET", key, packed(1)) for key in strings]
        + [("SET", key, session2_record(1)) for key in sessions]
    )
    script = redis.pipeline([("SCRIPT", "LOAD", batch_save_script())])[0].decode()
    packed_script = redis.pipeline([("SCRIPT", "LOAD", PACKED_SAVE)])[0].decode()

    def hash_write(i):
        return ("HSET", hashes[i], "version", versions[i] + 1, "created_at", now, "accessed_at", now,
                "idle_deadline", far, "expires_at", far, "data", DATA)

    def save_script(ids):
        # The prefixes and index keys are the store's defaults with this prefix.
        command = ["EVALSHA", script, 3, "{%s}:e" % PREFIX, "{%s}:k" % PREFIX, "{%s}:o" % PREFIX,
                   PREFIX + "s:", PREFIX + "u:"]
        for i in ids:
            # key name, now, expected version, expiry, when the key goes, no user, the record.
            command += [sessions[i], now, session2_versions[i], far, far + 1000, "",
                        session2_record(session2_versions[i] + 1)]
        assert redis.pipeline([command])[0] == b"1" * len(ids)

    def save_watch(ids):
        replies = redis.pipeline([["WATCH"] + [hashes[i] for i in ids]]
                                 + [["HMGET", hashes[i]] + CHECKED for i in ids])
        assert all(int(fields[0]) == versions[i] for i, fields in zip(ids, replies[1:]))
        replies = redis.pipeline([("MULTI",)] + [hash_write(i) for i in ids] + [("EXEC",)])
        assert replies[-1] is not None

    def save_unchecked(ids):
        redis.pipeline([["HMGET", hashes[i]] + CHECKED for i in ids])
        redis.pipeline([hash_write(i) for i in ids])

    def save_packed_script(ids):
        command = ["EVALSHA", packed_script, 0]
        for i in ids:
            command += [strings[i], packed_versions[i], now, packed(packed_versions[i] + 1)]
        assert redis.pipeline([command])[0] == [1] * len(ids)

    def save_packed_watch(ids):
        replies = redis.pipeline([["WATCH"] + [strings[i] for i in ids]] + [["GET", strings[i]] for i in ids])
        assert all(int(value.split(b"|")[0]) == packed_versions[i] for i, value in zip(ids, replies[1:]))
        replies = redis.pipeline([("MULTI",)] + [("SET", strings[i], packed(packed_versions[i] + 1)) for i in ids]
                                 + [("EXEC",)])
        assert replies[-1] is not None

    def save_blind(ids):
        redis.pipeline([("SET", tower[i], DATA, "EX", 1800) for i in ids])

    def load_hash(ids):
        redis.pipeline([["HMGET", hashes[i]] + RECORD for i in ids])

    def load_string(ids):
        redis.pipeline([["GET", strings[i]] for i in ids])

    def bump(counter):
        def after(ids):
            for i in ids:
                counter[i] += 1
        return after

    measurements = [
        ("save: script", save_script, bump(session2_versions)),
        ("save: watch", save_watch, bump(versions)),
        ("save: hmget+hset", save_unchecked, bump(versions)),
        ("save: packed script", save_packed_script, bump(packed_versions)),
        ("save: packed watch", save_packed_watch, bump(packed_versions)),
        ("save: set", save_blind, lambda ids: None),
        ("load: hmget 10 fields", load_hash, lambda ids: None),
        ("load: get", load_string, lambda ids: None),
    ]
    try:
        for name, operation, after in measurements * 2:
            start = redis.cpu_seconds()
            for round_ in range(ROUNDS):
                ids = range((round_ * BATCH) % SESSIONS, (round_ * BATCH) % SESSIONS + BATCH)
                operation(ids)
                after(ids)
            spent = redis.cpu_seconds() - start
            print("%-22s %5.2f µs of Redis CPU each" % (name, spent / (ROUNDS * BATCH) * 1e6))
    finally:
        redis.pipeline([("DEL", *keys) for keys in (sessions, hashes, strings, tower)]
                       + [("DEL", "{%s}:e" % PREFIX, "{%s}:k" % PREFIX, "{%s}:o" % PREFIX)])


if __name__ == "__main__":
    main()
