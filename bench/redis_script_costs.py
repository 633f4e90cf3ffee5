#!/usr/bin/env python3
"""Instructions Redis spends per call of session2's scripts, beside plain
commands (the table under "Targets not met" in BENCHMARKS.md).

Starts a private redis-server under `valgrind --tool=callgrind` on port
6390 (or the port given as the argument), so nothing of the test server is
touched. For each command: a warm-up from `redis-benchmark` (eight
clients), the counters zeroed, the same calls counted, the total divided
by the calls. Instruction counts do not depend on what else the machine
is doing; they include Redis's network handling. Needs valgrind
(`callgrind_control`), redis-server and redis-benchmark on the PATH.

Rows: `GET` and `SET … PXAT` of a session (tower-sessions' load and
save); a script that only returns, with no arguments and with the lease
script's; the lease script (session2's exclusive load), taking a lease
each call; the batch save script with 16 saves, each succeeding; the
create script, a new session under a fresh random key each call.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ beside the sources
from redis_layouts import STORE  # noqa: E402

CALLS = 4000
SAVE_CALLS = 1000
BATCH = 16
PREFIX = "{session2}:"
# A session as the benchmark's server stores it: its counter, no user.
RECORD = '2197|1795841020564||1795882417568|||1795839217568|1795839220564|1795841020564|{"counter":2197}'
NOW = "1795839300000"
INDEX_KEYS = [PREFIX + "exp", PREFIX + "keys", PREFIX + "owner"]
PREFIX_ARGS = [PREFIX + "s:", PREFIX + "u:"]


def script(name, parts):
    """The script `name` of `store/redis.rs`: its body after `parts`, the
    files `store/redis.rs` puts before it."""
    source = (STORE / "redis.rs").read_text()
    body = re.search(r"const %s: &str = \w+!\((.*?)r\"(.*?)\"\s*\);" % name, source, re.S).group(2)
    return "".join((STORE / part).read_text() for part in parts) + body


class Server:
    def __init__(self, port, out_dir):
        self.port = port
        self.out_dir = out_dir
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s/cg.%%p" % out_dir,
             "redis-server", "--port", port, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            if self.cli("PING") == "PONG":
                return
            time.sleep(0.2)
        raise RuntimeError("redis-server under valgrind did not answer on port %s" % port)

    def cli(self, *args):
        done = subprocess.run(["redis-cli", "-p", self.port, *args], capture_output=True, text=True)
        return done.stdout.strip()

    def benchmark(self, calls, command):
        # `-r`: each `__rand_int__` in the command becomes a random 12-digit number.
        subprocess.run(["redis-benchmark", "-p", self.port, "-n", str(calls), "-c", "8", "-q",
                        "-r", "1000000000000", *command],
                       check=True, capture_output=True)

    def instructions(self):
        """Instructions since the counters were last zeroed."""
        subprocess.run(["callgrind_control", "-d", str(self.process.pid)], check=True, capture_output=True)
        dumps = glob.glob("%s/cg.%d.*" % (self.out_dir, self.process.pid))
        for line in open(max(dumps, key=os.path.getmtime)):
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError("no totals in the callgrind dump")

    def per_call(self, calls, command, reset):
        reset()
        self.benchmark(calls, command)
        reset()
        subprocess.run(["callgrind_control", "-z", str(self.process.pid)], check=True, capture_output=True)
        self.benchmark(calls, command)
        return self.instructions() / calls

    def stop(self):
        self.cli("SHUTDOWN", "NOSAVE")
        self.process.wait()


def main():
    port = sys.argv[1] if len(sys.argv) > 1 else "6390"
    session = PREFIX + "s:" + "ab" * 32
    batch = [PREFIX + "s:%064x" % (i + 1) for i in range(BATCH)]
    with tempfile.TemporaryDirectory() as out_dir:
        redis = Server(port, out_dir)

        def reset():
            for key in [session, *batch]:
                redis.cli("SET", key, RECORD)

        def evalsha(source, keys, args):
            sha = redis.cli("SCRIPT", "LOAD", source)
            return ["EVALSHA", sha, str(len(keys)), *keys, *args]

        # The lease takes the session's key alone; the store's names are
        # three keys and two arguments of every other script.
        lease_args = [NOW, "12345678901234567", NOW]
        names_and_lease = PREFIX_ARGS + [session[len(PREFIX_ARGS[0]):], *lease_args]
        save_args = list(PREFIX_ARGS)
        for key in batch:
            # Key, now, expected version, expiry, PXAT, no user, the record
            # at the same version: every call's saves succeed.
            save_args += [key, NOW, "2197", "1795841020564", "1795844620564", "", RECORD]
        rows = [
            ("GET", CALLS, ["GET", session], 1),
            ("SET … PXAT", CALLS, ["SET", session, RECORD, "PXAT", "1795844620564"], 1),
            ("EVALSHA of `return 1`, no keys or arguments", CALLS, evalsha("return 1", [], []), 1),
            ("the same with 3 keys and 6 arguments (names, then a lease's)", CALLS,
             evalsha("return 1", INDEX_KEYS, names_and_lease), 1),
            ("the lease script (the session's key, 3 arguments)", CALLS,
             evalsha(script("LEASE", ["redis_prelude.lua"]), [session], lease_args), 1),
            ("the batch save script, %d saves a call, per save" % BATCH, SAVE_CALLS,
             evalsha(script("REPLACE_MANY", ["redis_names.lua", "redis_prelude.lua", "redis_write.lua"]),
                     INDEX_KEYS, save_args), BATCH),
            # Hex, now, then a record (expiry, PXAT, no user, the session).
            ("the create script, a fresh key each call", CALLS,
             evalsha(script("CREATE", ["redis_names.lua", "redis_prelude.lua", "redis_index.lua",
                                       "redis_write.lua"]),
                     INDEX_KEYS, PREFIX_ARGS + ["__rand_int__", NOW, "1795841020564", "1795844620564", "",
                                                RECORD]), 1),
        ]
        try:
            for name, calls, command, per in rows:
                print("%-60s %9.0f instructions" % (name, redis.per_call(calls, command, reset) / per), flush=True)
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
