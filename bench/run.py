#!/usr/bin/env python3
"""procpool's benchmark runner (issues 5 and 10). Usually run through `bash bench/run.sh`.

    python3 bench/run.py [--quick] [--check] [--no-build] [--only=apply,map_auto,...]
                         [--output=PATH]

Builds the C++ benchmarks twice (`bazel build -c opt //bench/...`, and once more with
`--config=static` for the start/stop figure of a statically linked binary), copies the binaries
aside, and runs every workload as repetitions in rounds: one repetition of procpool (whose
program measures its raw floor in the same process, alternating with it), then one of each
Python baseline (bench/py_baseline.py: multiprocessing.Pool and ProcessPoolExecutor), then the
next round. Prints one table (each figure the median of its repetitions with min-max, the
ratios, the targets, whether each holds, and the load average while it ran) and writes it to
bench/RESULTS.md with the machine, the date and the commit. A row that misses its target says
why, from what was measured.

Exit status: 0 when every benchmark ran (whether or not targets held: the table says), 2 when a
benchmark failed, could not be built or left a row without a figure; with --check, 1 when a
target was missed. Stdlib only.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = len(os.sched_getaffinity(0))
BENCH = os.path.join(ROOT, "bench")
CXX_BINARIES = ["raw_floor", "bench_apply", "bench_map", "bench_cpu", "bench_payload",
                "bench_startstop", "bench_imap_memory", "bench_scaling", "bench_remote",
                "bench_stop_check", "bench_output", "bench_scale"]
WORKLOAD_KEYS = ["apply", "apply_pinned", "map_auto", "map_chunk1", "imap", "imap_unordered",
                 "payload", "payload_bytes", "startstop", "startstop_static", "scaling",
                 "cpu_sha512", "remote", "stop_check", "output", "scale_fork", "scale_remote"]


# ---- running things ---------------------------------------------------------------------------

class Failure(Exception):
    pass


def busy_seconds():
    """CPU seconds all CPUs spent busy since boot (/proc/stat), and our reaped descendants'."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(parts[:8]) - idle) / hz, usage.ru_utime + usage.ru_stime


def run_json(argv, timeout, label):
    """Runs argv in its own process group; returns its JSON records. On timeout the group is
    killed (procpool's workers die with their parent) and the records printed so far are kept.
    Returns (records, note, share of the CPUs other programs used meanwhile)."""
    busy0, ours0 = busy_seconds()
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT)
    note = None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        note = "timed out after %d s" % timeout
    records = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    elapsed = time.monotonic() - start
    busy1, ours1 = busy_seconds()
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(elapsed, 1e-9) / CORES
    if note is None and proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise Failure("%s failed (exit %d): %s" % (label, proc.returncode,
                                                   err.strip().splitlines()[-1:] or ""))
    return records, note, (others if elapsed >= 2.0 else None)


def build(bazel, static):
    flags = ["-c", "opt"] + (["--config=static"] if static else [])
    print("$ %s build %s //bench/..." % (bazel, " ".join(flags)), flush=True)
    subprocess.run([bazel, "build"] + flags + ["//bench/..."], cwd=ROOT, check=True,
                   stdin=subprocess.DEVNULL)
    bin_dir = subprocess.run([bazel, "info"] + flags + ["bazel-bin"], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             stdin=subprocess.DEVNULL).stdout.strip()
    # Copied aside, so that a later build (the other configuration, a concurrent build) cannot
    # swap them under the run.
    aside = tempfile.mkdtemp(prefix="procpool-bench-")
    for name in CXX_BINARIES:
        shutil.copy2(os.path.join(bin_dir, "bench", name), os.path.join(aside, name))
    return aside


# ---- statistics and formatting ------------------------------------------------------------

class Figure:
    """Repetitions of one measurement: median and spread."""

    def __init__(self, values, note=None):
        self.values = [float(v) for v in values]
        self.note = note

    @property
    def ok(self):
        return bool(self.values)

    @property
    def median(self):
        return statistics.median(self.values)

    @property
    def lo(self):
        return min(self.values)

    @property
    def hi(self):
        return max(self.values)

    def fmt(self, unit_fmt):
        if not self.values:
            return "n/a" + (" (%s)" % self.note if self.note else "")
        if len(self.values) == 1:
            text = unit_fmt(self.median) + " (1 rep)"
        else:
            text = "%s (%s–%s)" % (unit_fmt(self.median), unit_fmt(self.lo), unit_fmt(self.hi))
        if self.note:
            text += " [%s]" % self.note
        return text


def fig(records, key="value", note=None):
    return Figure([r[key] for r in records if key in r], note)


def ratio_of(a, b, invert=False):
    """Ratio of two unpaired figures: median ratio, and the widest spread of the reps."""
    if not (a.ok and b.ok):
        return Figure([])
    if invert:
        a, b = b, a
    f = Figure([a.median / b.median])
    f.spread = (a.lo / b.hi, a.hi / b.lo)
    return f


def fmt_ratio(f, suffix="×"):
    if not f.ok:
        return "n/a"
    spread = getattr(f, "spread", None) or (f.lo, f.hi)
    if len(f.values) == 1 and not hasattr(f, "spread"):
        return "%.2f%s" % (f.median, suffix)
    return "%.2f%s (%.2f–%.2f)" % (f.median, suffix, spread[0], spread[1])


def us(v):
    return "%.1f µs" % v


def ms(v):
    return "%.2f ms" % v if v < 10 else "%.1f ms" % v


def rate(v):
    if v >= 1e6:
        return "%.2f M/s" % (v / 1e6)
    return "%.1f k/s" % (v / 1e3)


def gibs(v):
    return "%.2f GiB/s" % v


def mib(v):
    return "%.1f MiB" % v


def times(v):
    return "%.2f×" % v


# ---- the machine ------------------------------------------------------------------------------

def cpu_busy_fraction(seconds=1.0):
    """Fraction of all CPUs busy over `seconds` (other programs: we are idle while sampling)."""
    def sample():
        with open("/proc/stat") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
        return idle, sum(parts)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "include", "bench",
                                ":!bench/RESULTS.md"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in lib/, include/ or bench/"
    except OSError:
        commit = "unknown"
    return {
        "cores": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit or "unknown",
    }


# ---- the workloads ----------------------------------------------------------------------------

def plan(quick):
    """key -> dict(cxx=(binary, args), py={impl: args}, reps, timeout per process). Each process
    runs one repetition; `reps` rounds alternate procpool and its baselines."""
    r = (lambda n: max(2, n // 2)) if quick else (lambda n: n)
    imap_args = ["items=10000000", "chunksize=1000", "max_seconds=30"]
    return {
        "apply": dict(cxx=("bench_apply", ["calls=20000"]),
                      py={"pool": ["calls=3000"], "ppe": ["calls=3000"]},
                      reps=r(5), timeout=60),
        # The same, with everything pinned to CPU 0 (see bench_apply.cc): both kinds of
        # placement are targets.
        "apply_pinned": dict(cxx=("bench_apply", ["calls=20000", "cpu=0", "workers=%d" % CORES]),
                             py={"pool": ["calls=3000", "cpu=0", "workers=%d" % CORES],
                                 "ppe": ["calls=3000", "cpu=0", "workers=%d" % CORES]},
                             py_workload="apply", reps=r(5), timeout=60),
        "map_auto": dict(cxx=("bench_map", ["jobs=1000000", "chunksize=0"]),
                         py={"pool": ["jobs=1000000"], "ppe": ["jobs=1000000"]},
                         reps=r(7), timeout=30),
        "map_chunk1": dict(cxx=("bench_map", ["jobs=20000", "chunksize=1"]),
                           py={"pool": ["jobs=20000"], "ppe": ["jobs=20000"]},
                           reps=r(5), timeout=60),
        # A 10,000,000-item lazy input, chunksize 1,000 on both sides (imap's default chunksize
        # is 1 in both; 10M single-item tasks take minutes in either). The C++ program stops a
        # repetition that passes max_seconds and reports it incomplete.
        "imap": dict(cxx=("bench_imap_memory", imap_args),
                     py={"pool": ["items=10000000", "chunksize=1000"]},
                     py_workload="imap_memory", reps=r(3), timeout=120),
        "imap_unordered": dict(cxx=("bench_imap_memory", imap_args + ["unordered=1"]),
                               py={"pool": ["items=10000000", "chunksize=1000", "unordered=1"]},
                               py_workload="imap_memory", reps=r(3), timeout=120),
        "payload": dict(cxx=("bench_payload", ["payload_mib=16", "payloads=16", "kind=string"]),
                        py={"pool": ["payload_mib=16", "payloads=16"],
                            "ppe": ["payload_mib=16", "payloads=16"]},
                        reps=r(5), timeout=90),
        "payload_bytes": dict(cxx=("bench_payload", ["payload_mib=16", "payloads=16",
                                                     "kind=bytes"]),
                              py={}, reps=r(5), timeout=90),
        "startstop": dict(cxx=("bench_startstop", ["reps=20"]),
                          py={"pool": ["reps=20"], "ppe": ["reps=20"]},
                          reps=r(3), timeout=60),
        "startstop_static": dict(cxx=("bench_startstop", ["reps=20"]), static=True,
                                 py={}, reps=r(3), timeout=60),
        "scaling": dict(cxx=("bench_scaling", ["jobs=100000", "job_bytes=1024", "low=2",
                                               "high=8"]),
                        py={}, reps=r(5), timeout=90),
        "cpu_sha512": dict(cxx=("bench_cpu", ["jobs=200", "rounds=2000"]),
                           py={"pool": ["jobs=200", "rounds=2000"],
                               "ppe": ["jobs=200", "rounds=2000"]},
                           reps=r(5), timeout=90),
        # Remote workers over loopback TCP (issue 9): each repetition measures a raw TCP
        # ping-pong, then applies on a remote pool of one worker; then a map on forked workers,
        # then the same map on as many remote ones (bench_remote.cc).
        "remote": dict(cxx=("bench_remote", ["calls=5000", "items=1000000", "start_workers=64"]),
                       py={}, reps=r(5), timeout=300),
        # this_task::stop_requested() checked 1,000 times a task, against the same map without
        # (bench_stop_check.cc): both maps in each process, on one pool.
        "stop_check": dict(cxx=("bench_stop_check", ["jobs=4000", "steps=64", "reps=5"]),
                           py={}, reps=r(3), timeout=90),
        # Every task prints one line: forwarded output (issue 16) beside the same map with
        # inherited output, both written to /dev/null, in each repetition (bench_output.cc).
        "output": dict(cxx=("bench_output", ["jobs=200000", "chunksize=0"]),
                       py={}, reps=r(5), timeout=90),
        # Issue 19 item 5: 256 workers against 4 in the same process (bench_scale.cc), forked and
        # remote over loopback (one worker host per worker: 512 processes). One repetition each,
        # at the full size: 1,000,000 trivial tasks and 10,000 tasks of 1 ms.
        "scale_fork": dict(cxx=("bench_scale", ["mode=fork", "low=4", "high=256",
                                                "trivial=1000000", "slow=10000", "slow_us=1000"]),
                           py={}, reps=1, timeout=300),
        "scale_remote": dict(cxx=("bench_scale", ["mode=remote", "low=4", "high=256",
                                                  "trivial=1000000", "slow=10000", "slow_us=1000",
                                                  "idle_ms=5000"]),
                             py={}, reps=1, timeout=600),
    }


def run_all(binaries, static_binaries, only, quick):
    results = {}
    p = plan(quick)
    for key in WORKLOAD_KEYS:
        if only and key not in only:
            continue
        spec = p[key]
        binary, tail = spec["cxx"]
        bin_dir = static_binaries if spec.get("static") else binaries
        entry = {"cxx": [], "cxx_note": None, "others": []}
        for impl in spec["py"]:
            entry[impl] = []
            entry[impl + "_note"] = None
        started = time.monotonic()
        row_busy0, row_ours0 = busy_seconds()
        print("%s: %d rounds" % (key, spec["reps"]), flush=True)
        def one_rep(args):
            # One repetition per process, unless the workload says how many samples make one.
            return args if any(a.startswith("reps=") for a in args) else args + ["reps=1"]

        for _ in range(spec["reps"]):
            recs, note, others = run_json([os.path.join(bin_dir, binary)] + one_rep(tail),
                                          spec["timeout"], "procpool %s" % key)
            entry["cxx"] += recs
            entry["cxx_note"] = entry["cxx_note"] or note
            if others is not None:
                entry["others"].append(others)
            if note:
                break  # a repetition that timed out says enough; do not repeat it
            for impl, args in spec["py"].items():
                workload = spec.get("py_workload", key)
                precs, pnote, pothers = run_json(
                    [sys.executable, os.path.join(BENCH, "py_baseline.py"), workload, impl] +
                    one_rep(args), spec["timeout"], "Python %s %s" % (impl, key))
                entry[impl] += precs
                entry[impl + "_note"] = entry[impl + "_note"] or pnote
                if pothers is not None:
                    entry["others"].append(pothers)
        entry["load"] = os.getloadavg()[0]
        entry["seconds"] = time.monotonic() - started
        # Other programs' share of the CPUs over the whole row (a single run may be too short to
        # tell: /proc/stat counts in 10 ms ticks).
        row_busy1, row_ours1 = busy_seconds()
        if entry["seconds"] >= 1.0:
            entry["others"].append(max(0.0, (row_busy1 - row_busy0) - (row_ours1 - row_ours0)) /
                                   entry["seconds"] / CORES)
        print("  %.1f s, load average %.2f" % (entry["seconds"], entry["load"]), flush=True)
        results[key] = entry
    return results


# ---- the table --------------------------------------------------------------------------------

def evaluate(results, cores):
    """Rows of the table, the list of missed targets, notes, and the rows without a figure."""
    rows, missed, notes, unmeasured = [], [], [], []

    def py(entry, impl, key="value"):
        return fig(entry.get(impl, []), key, entry.get(impl + "_note"))

    def best_python(a, b, higher_is_better):
        cands = [f for f in (a, b) if f.ok]
        if not cands:
            return Figure([])
        pick = max if higher_is_better else min
        return pick(cands, key=lambda f: f.median)

    def check(name, holds, what, why=None):
        if holds is None:
            missed.append("%s: not measured (%s)" % (name, what))
            unmeasured.append(missed[-1])
            return "MISS (not measured)"
        if not holds:
            others = max(results[name]["others"]) if results[name]["others"] else 0.0
            if others > 0.10:
                why = ("other programs used %.0f%% of the CPUs while it ran (load average %.2f)%s"
                       % (100 * others, results[name]["load"], ("; " + why) if why else ""))
            missed.append("%s: %s%s" % (name, what, (". " + why) if why else ""))
            return "**MISS**"
        return "ok"

    def load(entry):
        text = "%.2f" % entry["load"]
        if entry["others"] and max(entry["others"]) > 0.10:
            text += " (others %.0f%%)" % (100 * max(entry["others"]))
        return text

    def row(label, measure, c, raw, pool, ppe, ratio, target, holds, entry):
        rows.append([label, measure, c, raw, pool, ppe, ratio, target, holds, load(entry)])

    for key, label in (("apply", "`apply`, tiny job, one at a time, placed by the scheduler"),
                       ("apply_pinned", "`apply`, tiny job, one at a time, all on CPU 0")):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        raw = fig(e["cxx"], "raw_us")
        ratio = fig(e["cxx"], "ratio_to_raw")
        holds = ratio.median <= 1.15 if ratio.ok else None
        row(label, "µs per round trip", c.fmt(us), raw.fmt(us) + " ping-pong",
            py(e, "pool").fmt(us), py(e, "ppe").fmt(us), "%s raw" % fmt_ratio(ratio),
            "≤ 1.15× raw",
            check(key, holds, "%s the raw ping-pong, target ≤ 1.15×" % fmt_ratio(ratio),
                  "The rest is the two extra poll() calls of a round trip and the frames' "
                  "encoding (apply: %s; ping-pong: %s)" % (c.fmt(us), raw.fmt(us))), e)

    for key, label, target in (("map_auto", "`map`, 1,000,000 × (x*x), automatic chunks", 20.0),
                               ("map_chunk1", "`map`, 20,000 × (x*x), chunksize 1", 10.0)):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        pool, ppe = py(e, "pool"), py(e, "ppe")
        ref = best_python(pool, ppe, True)
        ratio = ratio_of(c, ref)
        ratio_text = "%s Python" % fmt_ratio(ratio)
        holds = ratio.median >= target if ratio.ok else None
        raw = fig(e["cxx"], "raw_items_per_s")
        raw_text = raw.fmt(rate) + " packed" if raw.ok else "–"
        target_text = "≥ %g× Python" % target
        what = "%s the fastest Python, target ≥ %g×" % (fmt_ratio(ratio), target)
        if raw.ok:
            raw_ratio = Figure([r["value"] / r["raw_items_per_s"] for r in e["cxx"]
                                if "raw_items_per_s" in r])
            prefaulted = fig(e["cxx"], "raw_prefaulted_items_per_s")
            if prefaulted.ok:
                notes.append("%s: the raw floor makes a fresh result array within its time, as a "
                             "map must return one (%s); with one made and faulted in before its "
                             "clock starts it reaches %s, and procpool is %s of that"
                             % (key, raw.fmt(rate), prefaulted.fmt(rate),
                                fmt_ratio(Figure([r["value"] / r["raw_prefaulted_items_per_s"]
                                                  for r in e["cxx"]
                                                  if "raw_prefaulted_items_per_s" in r]))))
            ratio_text += "; %s raw" % fmt_ratio(raw_ratio)
            target_text += " and ≥ 0.4× raw"
            raw_holds = raw_ratio.median >= 0.4
            holds = (holds and raw_holds) if holds is not None else None
            if not raw_holds:
                what += "; %s the raw packed floor, target ≥ 0.4×" % fmt_ratio(raw_ratio)
        row(label, "items/s", c.fmt(rate), raw_text, pool.fmt(rate), ppe.fmt(rate), ratio_text,
            target_text, check(key, holds, what), e)

    for key, label in (("imap", "`imap` over a lazy 10,000,000-item input (chunksize 1,000)"),
                       ("imap_unordered", "`imap_unordered`, the same")):
        if key not in results:
            continue
        e = results[key]
        complete = [r for r in e["cxx"] if r.get("complete", 1)]
        partial = [r for r in e["cxx"] if not r.get("complete", 1)]
        speed = fig(complete, "items_per_s", e["cxx_note"])
        growth = fig(complete, "value")
        pool_speed = fig(e.get("pool", []), "items_per_s")
        pool_growth = fig(e.get("pool", []), "value")
        ratio = ratio_of(speed, pool_speed)
        if partial:
            r = partial[0]
            notes.append("%s: a procpool repetition was stopped at max_seconds after %d of "
                         "10,000,000 items (%s)" % (key, r["items_done"], rate(r["items_per_s"])))
        holds = None
        if ratio.ok and growth.ok:
            holds = ratio.median >= 5 and growth.hi < 64
        row(label, "items/s; parent RSS peak − start",
            "%s; %s" % (speed.fmt(rate), growth.fmt(mib)), "–",
            "%s; %s" % (pool_speed.fmt(rate), pool_growth.fmt(mib)),
            "n/a (Executor.map submits the whole input at once)",
            "%s Python" % fmt_ratio(ratio), "≥ 5× Python; < 64 MiB",
            check(key, holds, "%s Python's, RSS growth %s (targets ≥ 5×, < 64 MiB)"
                  % (fmt_ratio(ratio), growth.fmt(mib))), e)

    for key, label in (("payload", "16 MiB `std::string` jobs → length (16 per rep)"),
                       ("payload_bytes", "16 MiB `procpool::Bytes` jobs, read in place (16 per "
                                         "rep)")):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        raw = fig(e["cxx"], "raw_gib_per_s")
        ratio = fig(e["cxx"], "ratio_to_raw")
        to_memcpy = fig(e["cxx"], "ratio_to_memcpy")
        memcpy = fig(e["cxx"], "memcpy_gib_per_s")
        holds = ratio.median >= 1.0 if ratio.ok else None
        pool = py(e, "pool").fmt(gibs) if "pool" in e else "–"
        ppe = py(e, "ppe").fmt(gibs) if "ppe" in e else "–"
        notes.append("%s: %s a plain memcpy of the same payloads (%s; the moonshot is ≥ 0.8×)"
                     % (key, fmt_ratio(to_memcpy), memcpy.fmt(gibs)))
        row(label, "GiB/s", c.fmt(gibs), raw.fmt(gibs) + " socketpair copy", pool, ppe,
            "%s raw" % fmt_ratio(ratio), "≥ 1× raw",
            check(key, holds, "%s the raw socketpair copy, target ≥ 1×" % fmt_ratio(ratio)), e)

    for key, label in (("startstop", "pool start + close + join, workers = cores"),
                       ("startstop_static", "the same, built with `--config=static`")):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        raw = fig(e["cxx"], "raw_ms")
        per_rep = Figure([r["value"] / r["raw_ms"] for r in e["cxx"] if "raw_ms" in r])
        pool, ppe = py(e, "pool"), py(e, "ppe")
        ref = best_python(pool, ppe, False)
        faster = ratio_of(c, ref, invert=True)
        extra = ""
        if faster.ok:
            extra = "; %s faster than Python" % fmt_ratio(faster)
        if key == "startstop":
            holds = per_rep.median <= 1.3 if per_rep.ok else None
            status = check(key, holds, "%s the fork+exit+reap floor, target ≤ 1.3×"
                           % fmt_ratio(per_rep),
                           "procpool adds %s per start+stop over the floor (%s): a worker's "
                           "setup, enter(), the ready/shutdown/exited frames and its exit, "
                           "which do not shrink with fork()" % (
                               ms(c.median - raw.median) if (c.ok and raw.ok) else "n/a",
                               raw.fmt(ms)))
            target = "≤ 1.3× floor"
        else:
            status = "figure"
            target = "(the option's figure)"
            default = results.get("startstop")
            if per_rep.ok and c.ok and raw.ok and default:
                d_c = fig(default["cxx"])
                d_raw = fig(default["cxx"], "raw_ms")
                if d_c.ok and d_raw.ok:
                    notes.append(
                        "startstop_static: start + close + join %s against the default build's %s "
                        "(%.2f×); the fork+exit+reap floor %s against %s (%.2f×). procpool's own "
                        "part (%s static, %s default) is what the ratio to the floor measures"
                        % (ms(c.median), ms(d_c.median), c.median / d_c.median, ms(raw.median),
                           ms(d_raw.median), raw.median / d_raw.median,
                           ms(c.median - raw.median), ms(d_c.median - d_raw.median)))
        row(label, "ms", c.fmt(ms), raw.fmt(ms) + " fork+exit+reap",
            pool.fmt(ms) if "pool" in e else "–", ppe.fmt(ms) if "ppe" in e else "–",
            "%s floor%s" % (fmt_ratio(per_rep), extra), target, status, e)

    if "scaling" in results:
        e = results["scaling"]
        ratio = fig(e["cxx"], "value", e["cxx_note"])
        low = fig(e["cxx"], "low_items_per_s")
        high = fig(e["cxx"], "high_items_per_s")
        per_worker = fig(e["cxx"], "rss_growth_per_worker_mib")
        holds = ratio.median >= 0.9 if ratio.ok else None
        notes.append("scaling: the parent's resident memory grows by %s per worker (a pool of 8, "
                     "after a warm-up map; a worker's channel buffers and bookkeeping)"
                     % per_worker.fmt(mib))
        row("`map` of 100,000 × 1 KiB strings, 8 workers against 2 (on %d cores)" % cores,
            "items/s", "8: %s; 2: %s" % (high.fmt(rate), low.fmt(rate)), "–", "–", "–",
            "%s" % fmt_ratio(ratio), "≥ 0.9×",
            check("scaling", holds, "%s the throughput at 2 workers, target ≥ 0.9×"
                  % fmt_ratio(ratio)), e)

    if "stop_check" in results:
        e = results["stop_check"]
        ratio = fig(e["cxx"], "value", e["cxx_note"])
        checked = fig(e["cxx"], "checked_s")
        plain = fig(e["cxx"], "plain_s")
        holds = ratio.median <= 1.02 if ratio.ok else None
        notes.append("stop_check: one stop_requested() costs %s ns of a worker's CPU time (from "
                     "the difference of the two maps)" % fig(e["cxx"], "ns_per_check").fmt(
                         lambda v: "%.1f" % v))
        row("`map` of 4,000 tasks that check `this_task::stop_requested()` 1,000 times each, "
            "against the same without (tasks' CPU time)", "s wall",
            "checked: %s; plain: %s" % (checked.fmt(lambda v: "%.3f s" % v),
                                        plain.fmt(lambda v: "%.3f s" % v)),
            "–", "–", "–", "%s" % fmt_ratio(ratio), "≤ 1.02×",
            check("stop_check", holds, "%s the map without checks, target ≤ 1.02×"
                  % fmt_ratio(ratio)), e)

    if "cpu_sha512" in results:
        e = results["cpu_sha512"]
        c = fig(e["cxx"], note=e["cxx_note"])
        need = 0.95 * cores
        holds = c.median >= need if c.ok else None
        checks = {r.get("check") for k in ("cxx", "pool", "ppe") for r in e.get(k, [])}
        if len(checks) > 1:
            notes.append("cpu_sha512: C++ and Python hashed differently (%s)" % sorted(checks))
        busiest = fig(e["cxx"], "busiest_worker_jobs")
        notes.append("cpu_sha512: procpool serial %s s, pool %s s, the busiest worker ran %s of "
                     "the 200 jobs" % (fig(e["cxx"], "serial_s").fmt(lambda v: "%.3f" % v),
                                      fig(e["cxx"], "pool_s").fmt(lambda v: "%.3f" % v),
                                      busiest.fmt(lambda v: "%d" % v)))
        row("CPU-bound: 200 × SHA-512 chain of 2,000", "speedup over one process",
            c.fmt(times), "–", py(e, "pool").fmt(times), py(e, "ppe").fmt(times),
            "%.2f of %d cores" % (c.median / cores, cores) if c.ok else "n/a",
            "≥ 0.95 × cores (%.2f×)" % need,
            check("cpu_sha512", holds, "speedup %s, target ≥ %.2f× on %d cores"
                  % (c.fmt(times), need, cores)), e)
    if "remote" in results:
        e = results["remote"]
        applies = [r for r in e["cxx"] if r.get("bench") == "remote_apply"]
        maps = [r for r in e["cxx"] if r.get("bench") == "remote_map"]
        c = fig(applies, note=e["cxx_note"])
        raw = fig(applies, "raw_tcp_us")
        ratio = fig(applies, "ratio_to_raw")
        holds = ratio.median <= 2.0 if ratio.ok else None
        row("`apply` to a remote worker over loopback TCP, one at a time", "µs per round trip",
            c.fmt(us), raw.fmt(us) + " TCP ping-pong", "–", "–", "%s raw" % fmt_ratio(ratio),
            "≤ 2× raw",
            check("remote", holds, "remote apply %s the raw TCP ping-pong, target ≤ 2×"
                  % fmt_ratio(ratio)), e)
        c = fig(maps, note=e["cxx_note"])
        forked = fig(maps, "socketpair_items_per_s")
        ratio = fig(maps, "ratio_to_socketpair")
        holds = ratio.median <= 1.5 if ratio.ok else None
        row("`map`, 1,000,000 × (x*x), on %d remote workers over loopback TCP" % cores,
            "items/s", c.fmt(rate), forked.fmt(rate) + " forked (socketpairs)", "–", "–",
            "%s the forked map's time" % fmt_ratio(ratio), "≤ 1.5×",
            check("remote", holds, "remote map took %s the forked map's time, target ≤ 1.5×"
                  % fmt_ratio(ratio)), e)
        # Issue 18: TLS (the default) beside plaintext (encrypt = false) in the same run.
        plain_apply = fig(applies, "plaintext_us")
        ratio = fig(applies, "ratio_to_plaintext")
        holds = ratio.median <= 1.5 if ratio.ok else None
        row("`apply` to a remote worker over TLS, one at a time", "µs per round trip",
            fig(applies, note=e["cxx_note"]).fmt(us), plain_apply.fmt(us) + " plaintext", "–", "–",
            "%s plaintext" % fmt_ratio(ratio), "≤ 1.5× plaintext",
            check("remote", holds, "remote apply over TLS %s plaintext, target ≤ 1.5×"
                  % fmt_ratio(ratio)), e)
        plain_map = fig(maps, "plaintext_items_per_s")
        ratio = fig(maps, "throughput_to_plaintext")
        holds = ratio.median >= 0.7 if ratio.ok else None
        row("`map` on remote workers over TLS", "items/s", fig(maps, note=e["cxx_note"]).fmt(rate),
            plain_map.fmt(rate) + " plaintext", "–", "–",
            "%s plaintext's throughput" % fmt_ratio(ratio), "≥ 0.7×",
            check("remote", holds, "remote map over TLS had %s plaintext's throughput, target "
                  "≥ 0.7×" % fmt_ratio(ratio)), e)
        ms = lambda v: "%.1f ms" % v
        if any("pool_cpu_ms" in r for r in maps):
            notes.append("remote map over TLS: the timed map cost the pool's process %s of CPU "
                         "(plaintext: %s) and the workers and their relays %s (plaintext: %s); "
                         "the pool's thread alone needs longer than the whole plaintext map"
                         % (fig(maps, "pool_cpu_ms").fmt(ms),
                            fig(maps, "plaintext_pool_cpu_ms").fmt(ms),
                            fig(maps, "workers_cpu_ms").fmt(ms),
                            fig(maps, "plaintext_workers_cpu_ms").fmt(ms)))
        starts = [r for r in e["cxx"] if r.get("bench") == "remote_start"]
        if any("tls_minus_plaintext_cpu_ms" in r for r in starts):
            notes.append("remote start over TLS: CPU of the whole pool's life (start, close and "
                         "join; every process), TLS minus plaintext, %s; the pool's process alone "
                         "%s against %s (less noisy than the start's time on a loaded machine)"
                         % (fig(starts, "tls_minus_plaintext_cpu_ms").fmt(lambda v: "%.0f ms" % v),
                            fig(starts, "pool_cpu_ms").fmt(lambda v: "%.0f ms" % v),
                            fig(starts, "plaintext_pool_cpu_ms").fmt(lambda v: "%.0f ms" % v)))
        shakes = [r for r in e["cxx"] if r.get("bench") == "remote_tls_handshakes"]
        extra = fig(starts, "tls_minus_plaintext_ms")
        holds = extra.median <= 100 if extra.ok else None
        row("start of 64 launched remote workers, TLS minus plaintext", "ms",
            extra.fmt(lambda v: "%.0f" % v),
            fig(shakes).fmt(lambda v: "%.0f" % v) + " ms CPU of the 128 handshakes (both ends)",
            "–", "–", "–", "≤ 100 ms",
            check("remote", holds, "TLS added %s ms to a 64-worker start, target ≤ 100 ms"
                  % extra.fmt(lambda v: "%.0f" % v)), e)
    if "output" in results:
        e = results["output"]
        c = fig(e["cxx"], note=e["cxx_note"])
        inherited = fig(e["cxx"], "inherited_items_per_s")
        ratio = fig(e["cxx"], "ratio_to_inherited")
        holds = ratio.median >= 0.5 if ratio.ok else None
        row("`map`, 200,000 tasks that each print one line, output forwarded to the log sink",
            "items/s", c.fmt(rate), inherited.fmt(rate) + " inherited", "–", "–",
            "%s inherited" % fmt_ratio(ratio), "≥ 0.5× inherited",
            check("output", holds, "forwarded output %s the inherited map's throughput, "
                  "target ≥ 0.5×" % fmt_ratio(ratio)), e)
    for key, kind in (("scale_fork", "forked"), ("scale_remote", "remote (TLS, over loopback)")):
        if key not in results:
            continue
        e = results[key]
        recs = e["cxx"]
        c = fig(recs, note=e["cxx_note"])

        def pair(field, unit_fmt):
            return "256: %s; 4: %s" % (fig(recs, "high_" + field).fmt(unit_fmt),
                                       fig(recs, "low_" + field).fmt(unit_fmt))

        ns = lambda v: "%.1f ns" % v
        usec = lambda v: "%.1f µs" % v
        count = lambda v: "%.0f" % v
        holds = c.median <= 2.0 if c.ok else None
        row("`map`, 1,000,000 × (x*x), automatic chunks, on 256 %s workers against 4" % kind,
            "pool's CPU per task", pair("trivial_cpu_ns_per_task", ns), "–", "–", "–",
            "%s" % fmt_ratio(c), "≤ 2×",
            check(key, holds, "%s: the pool's CPU per trivial task at 256 workers is %s that at "
                  "4, target ≤ 2×" % (kind, fmt_ratio(c)),
                  "Automatic chunks are 4 a worker: 1,024 batches at 256 against 16 at 4. Cut "
                  "into 16 batches at 256 workers the same map costs %s a task (4 workers: %s); "
                  "see the notes" % (fig(recs, "high_low_batches_cpu_ns_per_task").fmt(ns),
                                     fig(recs, "low_low_batches_cpu_ns_per_task").fmt(ns))), e)
        slow = fig(recs, "slow_ratio")
        holds = slow.median <= 2.0 if slow.ok else None
        row("`map`, 10,000 tasks of 1 ms (a sleep), chunksize 1, on 256 %s workers against 4"
            % kind, "pool's CPU per task", pair("slow_cpu_us_per_task", usec), "–", "–", "–",
            "%s" % fmt_ratio(slow), "≤ 2×",
            check(key, holds, "%s: the pool's CPU per 1 ms task at 256 workers is %s that at 4, "
                  "target ≤ 2×" % (kind, fmt_ratio(slow))), e)
        running = fig(recs, "high_running_fds")
        holds = running.median <= 2 * 256 + 64 if running.ok else None
        row("the parent's descriptors, %s pool of 256" % kind, "open fds",
            "running: %s; peak, start-up included: %s" % (running.fmt(count),
                                                           fig(recs, "high_peak_fds").fmt(count)),
            "–", "–", "–", "4 workers: %s" % fig(recs, "low_peak_fds").fmt(count),
            "≤ 2 × 256 + 64 = 576", check(key, holds, "%s: %s descriptors at 256 workers, "
                                          "target ≤ 576" % (kind, running.fmt(count))), e)
        row("start-up of 256 %s workers (until all idle)" % kind, "ms",
            pair("start_ms", lambda v: "%.0f ms" % v), "–", "–", "–", "–", "(measured)",
            "figure", e)
        if key == "scale_remote":
            idle_high = fig(recs, "high_idle_bytes_per_host_s")
            idle_low = fig(recs, "low_idle_bytes_per_host_s")
            ratio = ratio_of(idle_high, idle_low)
            holds = ratio.median <= 2.0 if ratio.ok else None
            row("control connections (heartbeats) with nothing to do, 256 hosts against 4",
                "bytes per host and second", pair("idle_bytes_per_host_s",
                                                  lambda v: "%.0f B" % v),
                "–", "–", "–", "%s per host" % fmt_ratio(ratio), "≤ 2× per host",
                check(key, holds, "heartbeat bytes per host at 256 hosts %s those at 4, "
                      "target ≤ 2×" % fmt_ratio(ratio)), e)
            notes.append(
                "scale_remote: control-connection traffic (heartbeats, progress reports, the "
                "hosts' reports; TCP payload both ways) with nothing to do: %s data segments per "
                "host and second at 256 hosts (%s at 4); during the 1,000,000-task map %s bytes "
                "a task at 256 (%s at 4); during the 1 ms tasks %s bytes and %s segments a task "
                "at 256 (%s and %s at 4). Progress is reported at most every 10 ms a host (every "
                "100 ms while tasks shorter than that stream), so it is bounded by hosts x time, "
                "not by tasks: quick tasks share a report, and a task longer than 10 ms costs at "
                "most its start and its end"
                % (fig(recs, "high_idle_segments_per_host_s").fmt(lambda v: "%.2f" % v),
                   fig(recs, "low_idle_segments_per_host_s").fmt(lambda v: "%.2f" % v),
                   fig(recs, "high_trivial_control_bytes_per_task").fmt(lambda v: "%.3f" % v),
                   fig(recs, "low_trivial_control_bytes_per_task").fmt(lambda v: "%.4f" % v),
                   fig(recs, "high_slow_control_bytes_per_task").fmt(lambda v: "%.0f" % v),
                   fig(recs, "high_slow_control_segments_per_task").fmt(lambda v: "%.2f" % v),
                   fig(recs, "low_slow_control_bytes_per_task").fmt(lambda v: "%.0f" % v),
                   fig(recs, "low_slow_control_segments_per_task").fmt(lambda v: "%.2f" % v)))
        notes.append(
            "%s: the pool's CPU per round trip through its thread (apply_async(x).get(), one "
            "after the other, every other worker idle; about two wakes of the pool's loop each) "
            "%s at 256 workers, %s at 4 (%s): what a wake costs beyond the worker it serves. The "
            "loop waits on an epoll set and asks only the links something touched; one poll() "
            "over all the parent's descriptors, what each wake cost the kernel before, would take "
            "%s at 256 workers, %s at 4 (docs/ARCHITECTURE.md, Scale)"
            % (key, fig(recs, "high_roundtrip_cpu_us").fmt(usec),
               fig(recs, "low_roundtrip_cpu_us").fmt(usec),
               fmt_ratio(fig(recs, "roundtrip_ratio")),
               fig(recs, "high_poll_us").fmt(usec), fig(recs, "low_poll_us").fmt(usec)))
        notes.append(
            "%s: the trivial map's wall time %s at 256 workers, %s at 4; the 1 ms tasks' %s at "
            "256, %s at 4"
            % (key, fig(recs, "high_trivial_s").fmt(lambda v: "%.3f s" % v),
               fig(recs, "low_trivial_s").fmt(lambda v: "%.3f s" % v),
               fig(recs, "high_slow_s").fmt(lambda v: "%.2f s" % v),
               fig(recs, "low_slow_s").fmt(lambda v: "%.2f s" % v)))
    return rows, missed, notes, unmeasured


def render(rows, missed, notes, info, command, started, elapsed, busy_before, others):
    header = ["workload", "measure", "procpool", "raw floor", "Python Pool", "Python PPE",
              "ratio", "target", "holds", "load avg"]
    lines = []
    lines.append("# procpool benchmarks")
    lines.append("")
    lines.append("Produced by `%s` (bench/run.py); do not edit by hand." % command)
    lines.append("")
    lines.append("- Date: %s; the run took %.0f s (builds included)" % (started, elapsed))
    lines.append("- Machine: %d cores used (`sched_getaffinity`; %d online), %s, Linux %s"
                 % (info["cores"], info["cpus_online"], info["model"], info["kernel"]))
    lines.append("- procpool commit %s, built with `bazel build -c opt //bench/...` (and "
                 "`--config=static` for its row); Python %s" % (info["commit"], info["python"]))
    lines.append("- Other load: the CPUs were %.0f%% busy before the run; other programs used "
                 "%.0f%% of them during it (CPU time not spent by the benchmarks and their "
                 "children). The last column is the 1-minute load average when the row's runs "
                 "ended, with other programs' share where it passed 10%%."
                 % (busy_before * 100, others * 100))
    lines.append("- Each figure: median of the repetitions (min–max). The repetitions run in "
                 "rounds: one of procpool (whose program measures its raw floor in the same "
                 "process, alternating with it), then one of each Python baseline. Every "
                 "repetition forks a fresh pool with workers = cores and warms it up untimed, "
                 "except start/stop, which times exactly that. Ratios to Python use the faster "
                 "of Pool and PPE. Raw floors, on the same data: a 16-byte ping-pong over a "
                 "socketpair (`apply`), the same map as packed int64 chunks over plain "
                 "socketpairs with one chunk in flight per child, into a fresh result array "
                 "(automatic `map`), one "
                 "socketpair copy of the payloads into a reused buffer (payloads; also a memcpy "
                 "of them, in the notes), fork + exit + reap of as many children (start/stop), "
                 "a 16-byte ping-pong over loopback TCP (remote `apply`), and the same map on "
                 "forked workers (remote `map`).")
    lines.append("- Python: default start method (fork), workers = cores, Pool.map's default "
                 "chunksize for the automatic map; ProcessPoolExecutor.map gets Pool's chunksize "
                 "rule there (its default of 1 takes minutes), chunksize 1 for the chunksize-1 "
                 "map and its default elsewhere; PPE start/stop includes one trivial task (it "
                 "forks its workers on the first submit).")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    if notes:
        lines.append("Notes:")
        lines.append("")
        for n in notes:
            lines.append("- " + n)
        lines.append("")
    if missed:
        lines.append("**Targets missed (%d):**" % len(missed))
        lines.append("")
        for m in missed:
            lines.append("- " + m)
    else:
        lines.append("Every target holds.")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a target is missed (else 0 whenever the benchmarks ran)")
    parser.add_argument("--no-build", action="store_true",
                        help="use the binaries of the last `bazel build -c opt //bench/...` "
                             "(the static row then uses them too)")
    parser.add_argument("--only", default="", help="comma-separated workloads: " +
                        ",".join(WORKLOAD_KEYS))
    parser.add_argument("--output", default=os.path.join(BENCH, "RESULTS.md"))
    parser.add_argument("--bazel", default=os.environ.get("BAZEL", "bazel"))
    parser.add_argument("--command", default="bash bench/run.sh",
                        help="the command named in RESULTS.md")
    args = parser.parse_args()
    only = [k for k in args.only.split(",") if k]
    for k in only:
        if k not in WORKLOAD_KEYS:
            parser.error("unknown workload %r" % k)

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    asides = []
    try:
        if args.no_build:
            bin_dir = subprocess.run([args.bazel, "info", "-c", "opt", "bazel-bin"], cwd=ROOT,
                                     check=True, capture_output=True, text=True).stdout.strip()
            binaries = static_binaries = os.path.join(bin_dir, "bench")
        else:
            binaries = build(args.bazel, static=False)
            asides.append(binaries)
            static_binaries = binaries
            if not only or "startstop_static" in only:
                static_binaries = build(args.bazel, static=True)
                asides.append(static_binaries)
    except (subprocess.CalledProcessError, OSError) as e:
        print("benchmark failed: could not build: %s" % e, file=sys.stderr)
        return 2
    info = machine()
    busy = cpu_busy_fraction()
    print("%d cores; %.0f%% of the CPUs busy with other work before the run"
          % (info["cores"], busy * 100), flush=True)
    if busy > 0.15:
        print("warning: the machine is not idle; timings will be noisy", flush=True)
    busy_start, ours_start = busy_seconds()
    t_run = time.monotonic()
    try:
        results = run_all(binaries, static_binaries, only, args.quick)
    except Failure as e:
        print("benchmark failed: %s" % e, file=sys.stderr)
        return 2
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)
    busy_end, ours_end = busy_seconds()
    others = max(0.0, (busy_end - busy_start) - (ours_end - ours_start)) / max(
        time.monotonic() - t_run, 1e-9) / CORES
    rows, missed, notes, unmeasured = evaluate(results, info["cores"])
    text = render(rows, missed, notes, info, args.command, started, time.monotonic() - t0, busy,
                  others)
    print()
    print(text)
    with open(args.output, "w") as f:
        f.write(text)
    print("wrote %s" % os.path.relpath(args.output, ROOT))
    if unmeasured:
        # A row without a figure did not run, whatever the reason: the table is incomplete.
        print("benchmark failed: %d row(s) without a figure" % len(unmeasured), file=sys.stderr)
        for m in unmeasured:
            print("  " + m, file=sys.stderr)
        return 2
    if missed:
        print("targets missed: %d (see the table)" % len(missed), file=sys.stderr)
        for m in missed:
            print("  " + m, file=sys.stderr)
        if args.check:
            return 1
    else:
        print("every target holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
