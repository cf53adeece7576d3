"""A producer process for the benchmarks: pushes jobs with redis-py, as an application would.

    pusher.py PORT QUEUE COUNT RATE BATCH [--ready]

RATE 0 pushes as fast as it can, BATCH payloads per LPUSH.  With ``--ready`` it first
connects, then prints ``ready`` and pushes: a benchmark that times the pushes starts its clock
there, not at the interpreter's start (about 0.14 s here, 4% of a 40,000-job e2e run).
RATE > 0 sends one XADD per job on a schedule of RATE jobs/s, with an explicit id, and
prints {id: time sent} as JSON so the latency benchmark can match each job to the moment the
backend started it.
"""

from __future__ import annotations

import json
import sys
import time

import redis


def main() -> None:
    port, queue, count, rate, batch = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
        int(sys.argv[5]),
    )
    client = redis.Redis(port=port, protocol=2)
    if "--ready" in sys.argv[6:]:
        client.ping()
        print("ready", flush=True)
    if rate <= 0:
        for start in range(0, count, batch):
            payloads = [b'{"n":%d}' % n for n in range(start, min(start + batch, count))]
            client.lpush(queue, *payloads)
        return
    sent: dict[str, float] = {}
    begin = time.time()
    for n in range(count):
        due = begin + n / rate
        pause = due - time.time()
        if pause > 0:
            time.sleep(pause)
        job_id = f"lat-{n}"
        sent[job_id] = time.time()
        client.xadd(queue, {"payload": b'{"n":%d}' % n}, id=job_id)
    json.dump(sent, sys.stdout)


if __name__ == "__main__":
    main()
