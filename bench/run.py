#!/usr/bin/env python3
"""procpool's benchmark runner (issue 5). Usually run through `bash bench/run.sh`.

    python3 bench/run.py [--quick] [--no-build] [--only=apply,map_auto,...] [--output=PATH]

Builds the C++ benchmarks (`bazel build -c opt //bench/...`), copies the binaries aside, runs
them and the Python 3 baselines (bench/py_baseline.py: multiprocessing.Pool and
concurrent.futures.ProcessPoolExecutor) on the same workloads, in this one run, and prints one
table: each figure the median of several repetitions with the spread (min-max), the ratios, the
targets and whether each holds. Writes the table to bench/RESULTS.md with the machine's core
count, the date and the commit. Exits 1 when a target is missed (naming each), 2 when a benchmark
itself failed. Stdlib only.
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
                "bench_startstop", "bench_imap_memory"]
WORKLOAD_KEYS = ["apply", "apply_pinned", "map_auto", "map_chunk1", "cpu_sha512", "payload", "startstop",
                 "imap_memory"]


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


NOISE = {}  # label -> share of the machine other programs used while it ran


def run_json(argv, timeout, label):
    """Runs argv in its own process group; returns (records, note). On timeout the group is
    killed (procpool's workers die with their parent) and the records printed so far are kept.
    Also records how much of the machine other programs used meanwhile (NOISE)."""
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
    if elapsed >= 2.0:  # /proc/stat counts in 10 ms ticks: shorter runs give no usable share
        NOISE[label] = others
    status = note or ("exit %d" % proc.returncode if proc.returncode else "ok")
    print("  %-52s %6.1f s  %s; other programs used %2.0f%% of the CPUs"
          % (label, elapsed, status, others * 100), flush=True)
    if note is None and proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise Failure("%s failed (exit %d): %s" % (label, proc.returncode,
                                                   err.strip().splitlines()[-1:] or ""))
    return records, note


def build(bazel):
    print("$ %s build -c opt //bench/..." % bazel, flush=True)
    subprocess.run([bazel, "build", "-c", "opt", "//bench/..."], cwd=ROOT, check=True,
                   stdin=subprocess.DEVNULL)
    bin_dir = subprocess.run([bazel, "info", "-c", "opt", "bazel-bin"], cwd=ROOT, check=True,
                             capture_output=True, text=True,
                             stdin=subprocess.DEVNULL).stdout.strip()
    # Copy the binaries aside, so a concurrent build cannot swap them under the run.
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
        text = "%s (%s–%s)" % (unit_fmt(self.median), unit_fmt(self.lo), unit_fmt(self.hi))
        if len(self.values) == 1:
            text = unit_fmt(self.median) + " (1 rep)"
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
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "include"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in lib/ or include/"
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
    """(key, label, C++ argv tail, Python args, timeouts). Repetitions: 5 (3 when slow), --quick
    fewer."""
    r = (lambda n: max(2, n // 2)) if quick else (lambda n: n)
    return {
        "apply": dict(cxx=("bench_apply", ["calls=20000", "reps=%d" % r(5)]),
                      py={"pool": ["calls=3000", "reps=%d" % r(5)],
                          "ppe": ["calls=3000", "reps=%d" % r(5)]},
                      timeout=90),
        # The same, with everything pinned to CPU 0 (see bench_apply.cc): the stable comparison.
        "apply_pinned": dict(cxx=("bench_apply", ["calls=20000", "reps=%d" % r(5), "cpu=0",
                                                  "workers=%d" % CORES]),
                             py={"pool": ["calls=3000", "reps=%d" % r(5), "cpu=0",
                                          "workers=%d" % CORES],
                                 "ppe": ["calls=3000", "reps=%d" % r(5), "cpu=0",
                                         "workers=%d" % CORES]},
                             py_workload="apply", timeout=90),
        "map_auto": dict(cxx=("bench_map", ["jobs=1000000", "chunksize=0", "reps=%d" % r(5)]),
                         py={"pool": ["jobs=1000000", "reps=%d" % r(5)],
                             "ppe": ["jobs=1000000", "reps=%d" % r(5)]},
                         timeout=30),
        "map_chunk1": dict(cxx=("bench_map", ["jobs=20000", "chunksize=1", "reps=%d" % r(5)]),
                           py={"pool": ["jobs=20000", "reps=%d" % r(5)],
                               "ppe": ["jobs=20000", "reps=%d" % r(3)]},
                           timeout=60),
        "cpu_sha512": dict(cxx=("bench_cpu", ["jobs=200", "rounds=2000", "reps=%d" % r(7)]),
                           py={"pool": ["jobs=200", "rounds=2000", "reps=%d" % r(5)],
                               "ppe": ["jobs=200", "rounds=2000", "reps=%d" % r(5)]},
                           timeout=90),
        "payload": dict(cxx=("bench_payload", ["payload_mib=16", "payloads=16",
                                               "reps=%d" % r(5)]),
                        py={"pool": ["payload_mib=16", "payloads=16", "reps=%d" % r(5)],
                            "ppe": ["payload_mib=16", "payloads=16", "reps=%d" % r(5)]},
                        timeout=90),
        "startstop": dict(cxx=("bench_startstop", ["reps=%d" % r(20)]),
                          py={"pool": ["reps=%d" % r(20)], "ppe": ["reps=%d" % r(20)]},
                          timeout=60),
        # A 10,000,000-item lazy input, chunksize 1,000 on both sides (imap's default chunksize
        # is 1 in both; 10M single-item tasks take minutes in either). The C++ program stops a
        # repetition that passes max_seconds and reports it incomplete.
        "imap_memory": dict(cxx=("bench_imap_memory", ["items=10000000", "chunksize=1000",
                                                       "reps=%d" % r(3), "max_seconds=30"]),
                            py={"pool": ["items=10000000", "chunksize=1000", "reps=%d" % r(3)]},
                            timeout=120),
    }


def run_all(binaries, only, quick):
    results = {}
    p = plan(quick)
    for key in WORKLOAD_KEYS:
        if only and key not in only:
            continue
        spec = p[key]
        print("%s:" % key, flush=True)
        binary, tail = spec["cxx"]
        cxx, note = run_json([os.path.join(binaries, binary)] + tail, spec["timeout"],
                             "procpool (%s %s)" % (binary, " ".join(tail)))
        entry = {"cxx": cxx, "cxx_note": note}
        for impl, args in spec["py"].items():
            workload = spec.get("py_workload", key)
            recs, pnote = run_json([sys.executable, os.path.join(BENCH, "py_baseline.py"),
                                    workload, impl] + args, spec["timeout"],
                                   "Python %s (%s)" % (impl, " ".join(args)))
            entry[impl] = recs
            entry[impl + "_note"] = pnote
        results[key] = entry
    return results


# ---- the table --------------------------------------------------------------------------------

def evaluate(results, cores):
    """Rows of the table and the list of missed targets."""
    rows, missed, notes = [], [], []

    def py(entry, impl, key="value"):
        return fig(entry.get(impl, []), key, entry.get(impl + "_note"))

    def best_python(a, b, higher_is_better):
        cands = [f for f in (a, b) if f.ok]
        if not cands:
            return Figure([])
        pick = max if higher_is_better else min
        return pick(cands, key=lambda f: f.median)

    def check(name, holds, what):
        if holds is None:
            missed.append("%s: not measured (%s)" % (name, what))
            return "MISS (not measured)"
        if not holds:
            missed.append("%s: %s" % (name, what))
            return "**MISS**"
        return "ok"

    for key, label in (("apply", "`apply`, tiny job, one at a time"),
                       ("apply_pinned", "`apply`, tiny job, one at a time, all on CPU 0")):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        raw = fig(e["cxx"], "raw_us")
        ratio = fig(e["cxx"], "ratio_to_raw")
        holds = ratio.median <= 1.3 if ratio.ok else None
        rows.append([label, "µs per round trip",
                     c.fmt(us), raw.fmt(us) + " ping-pong", py(e, "pool").fmt(us),
                     py(e, "ppe").fmt(us), "%s raw" % fmt_ratio(ratio), "≤ 1.3× raw",
                     check(key, holds, "%s the raw ping-pong, target ≤ 1.3×"
                           % fmt_ratio(ratio))])

    for key, label, target in (("map_auto", "`map`, 1,000,000 × (x*x), automatic chunks", 10.0),
                               ("map_chunk1", "`map`, 20,000 × (x*x), chunksize 1", 5.0)):
        if key not in results:
            continue
        e = results[key]
        c = fig(e["cxx"], note=e["cxx_note"])
        pool, ppe = py(e, "pool"), py(e, "ppe")
        ref = best_python(pool, ppe, True)
        if not c.ok and e["cxx_note"]:
            # Timed out in the first repetition: all we know is an upper bound.
            jobs = 1_000_000 if key == "map_auto" else 20_000
            bound = jobs / float(e["cxx_note"].split()[3])
            c = Figure([], note="%s: < %s" % (e["cxx_note"], rate(bound)))
            ratio = Figure([])
            ratio_text = "< %.2f× Python" % (bound / ref.median) if ref.ok else "n/a"
            holds = False
        else:
            ratio = ratio_of(c, ref)
            ratio_text = "%s Python" % fmt_ratio(ratio)
            holds = ratio.median >= target if ratio.ok else None
        raw = fig(e["cxx"], "raw_items_per_s")
        raw_text = raw.fmt(rate) + " packed" if raw.ok else "–"
        rows.append([label, "items/s", c.fmt(rate), raw_text, pool.fmt(rate), ppe.fmt(rate),
                     ratio_text, "≥ %g× Python" % target,
                     check(key, holds, "%s the fastest Python, target ≥ %g×"
                           % (ratio_text.replace(" Python", ""), target))])

    if "cpu_sha512" in results:
        e = results["cpu_sha512"]
        c = fig(e["cxx"], note=e["cxx_note"])
        need = 0.95 * cores
        holds = c.median >= need if c.ok else None
        checks = {r.get("check") for k in ("cxx", "pool", "ppe") for r in e.get(k, [])}
        if len(checks) > 1:
            notes.append("cpu_sha512: C++ and Python hashed differently (%s)" % sorted(checks))
        serial = fig(e["cxx"], "serial_s")
        pooled = fig(e["cxx"], "pool_s")
        busiest = fig(e["cxx"], "busiest_worker_jobs")
        notes.append("cpu_sha512: procpool serial %s, pool %s (s), the busiest worker ran %s of "
                     "the 200 jobs; Python Pool serial %s, pool %s"
                     % (serial.fmt(lambda v: "%.3f" % v), pooled.fmt(lambda v: "%.3f" % v),
                        busiest.fmt(lambda v: "%d" % v),
                        py(e, "pool", "serial_s").fmt(lambda v: "%.3f" % v),
                        py(e, "pool", "pool_s").fmt(lambda v: "%.3f" % v)))
        rows.append(["CPU-bound: 200 × SHA-512 chain of 2,000", "speedup over one process",
                     c.fmt(times), "–", py(e, "pool").fmt(times), py(e, "ppe").fmt(times),
                     "%.2f of %d cores" % (c.median / cores, cores) if c.ok else "n/a",
                     "≥ 0.95 × cores (%.2f×)" % need,
                     check("cpu_sha512", holds, "speedup %s, target ≥ %.2f× on %d cores"
                           % (c.fmt(times), need, cores))])

    if "payload" in results:
        e = results["payload"]
        c = fig(e["cxx"], note=e["cxx_note"])
        raw = fig(e["cxx"], "raw_gib_per_s")
        ratio = fig(e["cxx"], "ratio_to_raw")
        holds = ratio.median >= 1.0 if ratio.ok else None
        rows.append(["16 MiB byte-string jobs → length (16 per rep)", "GiB/s",
                     c.fmt(gibs), raw.fmt(gibs), py(e, "pool").fmt(gibs), py(e, "ppe").fmt(gibs),
                     "%s raw" % fmt_ratio(ratio), "≥ 1× raw",
                     check("payload", holds, "%s the raw socketpair copy, target ≥ 1×"
                           % fmt_ratio(ratio))])

    if "startstop" in results:
        e = results["startstop"]
        c = fig(e["cxx"], note=e["cxx_note"])
        pool, ppe = py(e, "pool"), py(e, "ppe")
        ref = best_python(pool, ppe, False)
        ratio = ratio_of(c, ref, invert=True)
        holds = ratio.median >= 20 if ratio.ok else None
        raw = fig(e["cxx"], "raw_ms")
        if raw.ok and ref.ok and ref.median / raw.median < 20:
            notes.append("startstop: forking %d children that exit at once and reaping them takes "
                         "%s in the benchmark program itself: the fastest Python (%s) is only "
                         "%.1f× that floor, so ≥ 20× cannot be met with fork() on this machine"
                         % (cores, ms(raw.median), ms(ref.median), ref.median / raw.median))
        rows.append(["pool start + close + join, workers = cores", "ms",
                     c.fmt(ms), raw.fmt(ms) + " fork+exit+reap" if raw.ok else "–",
                     pool.fmt(ms), ppe.fmt(ms),
                     "%s faster" % fmt_ratio(ratio), "≥ 20× faster",
                     check("startstop", holds, "%s faster than the fastest Python, target ≥ 20×"
                           % fmt_ratio(ratio))])

    if "imap_memory" in results:
        e = results["imap_memory"]
        complete = [r for r in e["cxx"] if r.get("complete", 1)]
        partial = [r for r in e["cxx"] if not r.get("complete", 1)]
        c = fig(complete, note=e["cxx_note"])
        start, peak = fig(complete, "start_mib"), fig(complete, "peak_mib")
        speed = fig(complete, "items_per_s")
        if partial:
            r = partial[0]
            notes.append("imap_memory: a procpool repetition was stopped at max_seconds after "
                         "%d of 10,000,000 items (%s); peak − start so far %.1f MiB"
                         % (r["items_done"], rate(r["items_per_s"]), r["value"]))
        pool = py(e, "pool")
        holds = c.median < 64 if c.ok else None
        if c.ok:
            measured = "%s (start %s, peak %s; %s)" % (c.fmt(mib), mib(start.median),
                                                       mib(peak.median), rate(speed.median))
        elif partial:
            measured = "incomplete: %d items in %.0f s (%s), %.1f MiB so far" % (
                partial[0]["items_done"], partial[0]["seconds"],
                rate(partial[0]["items_per_s"]), partial[0]["value"])
        else:
            measured = c.fmt(mib)
        pool_text = pool.fmt(mib)
        if pool.ok:
            pool_text += " (%s)" % rate(fig(e["pool"], "items_per_s").median)
        rows.append(["`imap` over a lazy 10,000,000-item input (chunksize 1,000)",
                     "parent RSS peak − start", measured, "–", pool_text,
                     "n/a (Executor.map submits the whole input at once)",
                     "–", "< 64 MiB",
                     check("imap_memory", holds,
                           measured if not c.ok else "peak − start %s, target < 64 MiB"
                           % c.fmt(mib))])
    noisy = ["%s: %.0f%%" % (label, share * 100) for label, share in NOISE.items()
             if share > 0.10]
    if noisy:
        notes.append("Other programs used more than 10%% of the CPUs while these ran (their "
                     "figures are less reliable; runs under 2 s are not assessed): %s"
                     % "; ".join(noisy))
    return rows, missed, notes


def render(rows, missed, notes, info, command, started, elapsed, busy_before, load, others):
    header = ["workload", "measure", "procpool", "raw floor", "Python Pool", "Python PPE",
              "ratio", "target", "holds"]
    lines = []
    lines.append("# procpool benchmarks")
    lines.append("")
    lines.append("Produced by `%s` (bench/run.py); do not edit by hand." % command)
    lines.append("")
    lines.append("- Date: %s; run took %.0f s" % (started, elapsed))
    lines.append("- Machine: %d cores used (`sched_getaffinity`; %d online), %s, Linux %s"
                 % (info["cores"], info["cpus_online"], info["model"], info["kernel"]))
    lines.append("- procpool commit %s, built with `bazel build -c opt //bench/...`; Python %s"
                 % (info["commit"], info["python"]))
    lines.append("- Other load: other programs used %.0f%% of the CPUs during the run (CPU time "
                 "not spent by the benchmarks and their children); load average at the end %s"
                 % (others * 100, load))
    lines.append("- Each figure: median of the repetitions (min–max). Every repetition forks a "
                 "fresh pool with workers = cores and warms it up untimed, except start/stop, "
                 "which times exactly that. Ratios to Python use the faster of Pool and PPE. "
                 "Raw floors run in the same program, alternating with procpool, on the same "
                 "data: a 16-byte ping-pong over a socketpair (`apply`), the same map as packed "
                 "int64 chunks over plain socketpairs (automatic `map`), one socketpair copy of the "
                 "payloads (large payloads), fork + exit + reap of as many children (start/stop). "
                 "`apply` runs twice: placed by the scheduler, and with every process pinned to "
                 "CPU 0 (on a VM a cross-CPU wake-up costs several times a same-CPU one, and "
                 "placement otherwise decides which one a run measures).")
    lines.append("- Python: default start method (fork), workers = cores, Pool.map's default "
                 "chunksize for the automatic map; ProcessPoolExecutor.map gets Pool's chunksize "
                 "rule there (its default of 1 takes minutes), chunksize 1 for the chunksize-1 "
                 "map and its default elsewhere; PPE start/stop includes one trivial task (it "
                 "forks its workers on the first submit).")
    lines.append("")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
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
    parser.add_argument("--no-build", action="store_true",
                        help="use the binaries of the last `bazel build -c opt //bench/...`")
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
    if args.no_build:
        bin_dir = subprocess.run([args.bazel, "info", "-c", "opt", "bazel-bin"], cwd=ROOT,
                                 check=True, capture_output=True, text=True).stdout.strip()
        binaries = os.path.join(bin_dir, "bench")
    else:
        binaries = build(args.bazel)
    info = machine()
    busy = cpu_busy_fraction()
    print("%d cores; %.0f%% of the CPUs busy with other work before the run"
          % (info["cores"], busy * 100), flush=True)
    if busy > 0.15:
        print("warning: the machine is not idle; timings will be noisy", flush=True)
    busy_start, ours_start = busy_seconds()
    t_run = time.monotonic()
    try:
        results = run_all(binaries, only, args.quick)
    except Failure as e:
        print("benchmark failed: %s" % e, file=sys.stderr)
        return 2
    finally:
        if not args.no_build:
            shutil.rmtree(binaries, ignore_errors=True)
    load = "%.2f %.2f %.2f" % os.getloadavg()
    busy_end, ours_end = busy_seconds()
    others = max(0.0, (busy_end - busy_start) - (ours_end - ours_start)) / max(
        time.monotonic() - t_run, 1e-9) / CORES
    rows, missed, notes = evaluate(results, info["cores"])
    text = render(rows, missed, notes, info, args.command, started, time.monotonic() - t0, busy,
                  load, others)
    print()
    print(text)
    with open(args.output, "w") as f:
        f.write(text)
    print("wrote %s" % os.path.relpath(args.output, ROOT))
    if missed:
        print("TARGETS MISSED: %d" % len(missed), file=sys.stderr)
        for m in missed:
            print("  " + m, file=sys.stderr)
        return 1
    print("every target holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
