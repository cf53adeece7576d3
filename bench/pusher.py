"""A producer process for the benchmarks: pushes jobs with redis-py, as an application would.

    pusher.py PORT QUEUE COUNT RATE BATCH [--ready]

RATE 0 pushes as fast as it can, BATCH payloads per LPUSH, on one connection.  With
``--ready`` it first connects, then prints ``ready`` and pushes: a benchmark that times the
pushes starts its clock there, not at the interpreter's start (about 0.14 s here, 4% of a
40,000-job e2e run).

RATE > 0 sends one XADD per job, with an explicit id, on a fixed schedule of RATE jobs/s
(job n is due ``n / RATE`` s after the start), whatever the replies' pace: PACED_CONNECTIONS
connections take the jobs in turn, so a push that waits for its fsync (SQLite answers ~1 ms
later) does not hold back the next one.  A closed loop, one push after another's reply,
sent 818 jobs/s on SQLite when asked for 1,000, and the backlog it hid never showed in the
latency.  Prints {id: [time due, time sent]} as JSON; the latency benchmark measures from
the time due, so a late push counts against the figure.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import redis

PACED_CONNECTIONS = 8


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
    json.dump(paced(port, queue, count, rate), sys.stdout)


def paced(port: int, queue: str, count: int, rate: float) -> dict[str, tuple[float, float]]:
    clients = [redis.Redis(port=port, protocol=2) for _ in range(PACED_CONNECTIONS)]
    for client in clients:
        client.ping()  # connected before the schedule starts
    sent: dict[str, tuple[float, float]] = {}
    begin = time.time() + 0.05  # the threads started by then

    def push(client: redis.Redis, first: int) -> None:
        for n in range(first, count, PACED_CONNECTIONS):
            due = begin + n / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            job_id = f"lat-{n}"
            at = time.time()
            client.xadd(queue, {"payload": b'{"n":%d}' % n}, id=job_id)
            sent[job_id] = (due, at)

    threads = [
        threading.Thread(target=push, args=(client, first)) for first, client in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(sent) != count:
        raise SystemExit(f"only {len(sent)} of {count} jobs were pushed")
    return sent


if __name__ == "__main__":
    main()
