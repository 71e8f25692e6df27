#!/usr/bin/env python3
"""Python 3 baselines for procpool's benchmarks: multiprocessing.Pool ("pool") and
concurrent.futures.ProcessPoolExecutor ("ppe") on the same workloads as the C++ programs.

    python3 bench/py_baseline.py WORKLOAD IMPL [key=value ...]

WORKLOAD: apply (cpu=N: pinned) | map_auto | map_chunk1 | cpu_sha512 | payload | startstop |
          imap_memory (unordered=1: imap_unordered)
IMPL: pool | ppe. Prints one JSON line per repetition, like the C++ programs.

Settings are Python's defaults or its best ordinary ones, never worse: the default start method
(fork on Linux), workers = the CPUs this process may use, Pool.map's default chunksize for the
automatic map. ProcessPoolExecutor.map's default chunksize is 1, which makes the 1,000,000-job map
take minutes; there it gets Pool.map's rule (about four chunks per worker) instead, which is what a
user tuning it would do. Each repetition makes a fresh pool and warms it up (untimed) except
startstop, which times exactly the start and the shutdown.
"""

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time


def square(x):
    return x * x


def increment(x):
    return x + 1


def noop(*_):
    return None


def hash_chain(job, rounds=2000):
    digest = hashlib.sha512(job.encode()).digest()
    for _ in range(rounds - 1):
        digest = hashlib.sha512(digest).digest()
    return digest


def workers():
    return len(os.sched_getaffinity(0))


def emit(bench, impl, metric, value, unit, **extra):
    record = {"bench": bench, "impl": impl, "metric": metric, "value": value, "unit": unit}
    record.update(extra)
    print(json.dumps(record), flush=True)


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def pool_chunksize(n, w):
    """multiprocessing.Pool.map's default chunksize."""
    chunksize, extra = divmod(n, w * 4)
    return chunksize + 1 if extra else chunksize


def make(impl, n, **kwargs):
    if impl == "pool":
        return multiprocessing.Pool(n, **kwargs)
    return concurrent.futures.ProcessPoolExecutor(n, **kwargs)


def shut(impl, executor):
    if impl == "pool":
        executor.close()
        executor.join()
    else:
        executor.shutdown(wait=True)


def pmap(impl, executor, fn, items, chunksize=None):
    """map with the implementation's default chunksize unless one is given."""
    if impl == "pool":
        if chunksize is None:
            return executor.map(fn, items)
        return executor.map(fn, items, chunksize=chunksize)
    if chunksize is None:
        return list(executor.map(fn, items))
    return list(executor.map(fn, items, chunksize=chunksize))


def bench_map(impl, args, name):
    n = int(args.get("jobs", 1_000_000 if name == "map_auto" else 20_000))
    reps = int(args.get("reps", 5))
    w = workers()
    data = list(range(n))
    for _ in range(reps):
        ex = make(impl, w)
        pmap(impl, ex, square, range(64), chunksize=1)  # warm-up: every worker started
        if name == "map_chunk1":
            chunksize = 1
        elif impl == "pool":
            chunksize = None  # Pool.map's default: about four chunks per worker
        else:
            chunksize = pool_chunksize(n, w)  # Executor.map's default (1) would take minutes
        start = time.perf_counter()
        out = pmap(impl, ex, square, data, chunksize)
        seconds = time.perf_counter() - start
        assert out[n - 1] == (n - 1) * (n - 1)
        shut(impl, ex)
        emit(name, impl, "items_per_s", n / seconds, "items/s", seconds=seconds, workers=w)


def bench_apply(impl, args):
    n = int(args.get("calls", 5000 if impl == "pool" else 3000))
    reps = int(args.get("reps", 5))
    w = int(args.get("workers", 0)) or workers()
    name = "apply"
    if "cpu" in args:
        # Pinned, with every process it forks, like bench_apply cpu=N.
        os.sched_setaffinity(0, {int(args["cpu"])})
        name = "apply_pinned"
    for _ in range(reps):
        ex = make(impl, w)
        if impl == "pool":
            call = lambda i: ex.apply(increment, (i,))
        else:
            call = lambda i: ex.submit(increment, i).result()
        for i in range(max(100, n // 10)):
            call(i)
        start = time.perf_counter()
        for i in range(n):
            if call(i) != i + 1:
                raise AssertionError("wrong result")
        seconds = time.perf_counter() - start
        shut(impl, ex)
        emit(name, impl, "us_per_call", seconds / n * 1e6, "us", workers=w)


def bench_cpu(impl, args):
    n = int(args.get("jobs", 200))
    rounds = int(args.get("rounds", 2000))
    reps = int(args.get("reps", 5))
    w = workers()
    jobs = ["procpool-job-%d" % i for i in range(n)]
    for _ in range(reps):
        start = time.perf_counter()
        serial = [hash_chain(job, rounds) for job in jobs]
        serial_s = time.perf_counter() - start
        ex = make(impl, w)
        pmap(impl, ex, noop, range(w), chunksize=1)
        chunksize = None if impl == "pool" else pool_chunksize(n, w)
        start = time.perf_counter()
        parallel = pmap(impl, ex, hash_chain, jobs, chunksize)
        pool_s = time.perf_counter() - start
        shut(impl, ex)
        assert parallel == serial
        check = int.from_bytes(serial[0][:6], "big")
        emit("cpu_sha512", impl, "speedup", serial_s / pool_s, "x", serial_s=serial_s,
             pool_s=pool_s, workers=w, check=check)


def bench_payload(impl, args):
    size = int(args.get("payload_mib", 16)) << 20
    count = int(args.get("payloads", 16))
    reps = int(args.get("reps", 5))
    w = workers()
    payloads = [bytes([97 + i % 26]) * size for i in range(count)]
    total_gib = size * count / (1 << 30)
    for _ in range(reps):
        ex = make(impl, w)
        pmap(impl, ex, len, payloads[:w], chunksize=1)
        start = time.perf_counter()
        lengths = pmap(impl, ex, len, payloads)
        seconds = time.perf_counter() - start
        shut(impl, ex)
        assert lengths == [size] * count
        emit("payload", impl, "gib_per_s", total_gib / seconds, "GiB/s", workers=w)


def bench_startstop(impl, args):
    reps = int(args.get("reps", 10))
    w = workers()
    for _ in range(reps):
        start = time.perf_counter()
        ex = make(impl, w, initializer=noop)
        if impl == "ppe":
            # An executor forks its workers on the first submit, not before.
            ex.submit(noop).result()
        shut(impl, ex)
        emit("startstop", impl, "ms", (time.perf_counter() - start) * 1e3, "ms", workers=w)


def bench_imap_memory(impl, args):
    n = int(args.get("items", 10_000_000))
    chunksize = int(args.get("chunksize", 1000))
    reps = int(args.get("reps", 3))
    w = workers()
    unordered = args.get("unordered", "0") == "1"
    if impl != "pool":
        raise SystemExit("imap_memory: only multiprocessing.Pool has a lazy imap")
    for _ in range(reps):
        ex = make(impl, w)
        ex.map(noop, range(w), chunksize=1)
        start_kib = proc_status_kib("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        count = 0
        total = 0
        if unordered:
            for value in ex.imap_unordered(square, range(n), chunksize=chunksize):
                total += value
                count += 1
        else:
            for value in ex.imap(square, range(n), chunksize=chunksize):
                if value != count * count:
                    raise AssertionError("wrong result or order")
                total += value
                count += 1
        seconds = time.perf_counter() - start
        peak_kib = proc_status_kib("VmHWM")
        shut(impl, ex)
        assert count == n and total == (n - 1) * n * (2 * n - 1) // 6
        emit("imap_unordered_memory" if unordered else "imap_memory", impl,
             "peak_minus_start_mib", (peak_kib - start_kib) / 1024, "MiB",
             start_mib=start_kib / 1024, peak_mib=peak_kib / 1024, seconds=seconds,
             items_per_s=n / seconds, workers=w)


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    workload, impl = sys.argv[1], sys.argv[2]
    args = dict(arg.lstrip("-").split("=", 1) for arg in sys.argv[3:])
    if impl not in ("pool", "ppe"):
        raise SystemExit("IMPL must be pool or ppe")
    if workload in ("map_auto", "map_chunk1"):
        bench_map(impl, args, workload)
    elif workload == "apply":
        bench_apply(impl, args)
    elif workload == "cpu_sha512":
        bench_cpu(impl, args)
    elif workload == "payload":
        bench_payload(impl, args)
    elif workload == "startstop":
        bench_startstop(impl, args)
    elif workload == "imap_memory":
        bench_imap_memory(impl, args)
    else:
        raise SystemExit("unknown workload " + workload)


if __name__ == "__main__":
    main()
