#!/usr/bin/env python3
"""Compiles every ```cpp block of the given Markdown files (default: README.md and docs/guide.md).

Usage: python3 tools/check_snippets.py [--keep DIR] [FILE.md ...]

Each block is its own translation unit, compiled with g++ -std=c++20 -Wall -Wextra -Werror
(unused variables and parameters and missing designated initializers allowed; a discarded
[[nodiscard]] result is an error) against include/, the system Abseil and Cap'n Proto, and the
protocol header generated here with `capnp compile` (as tools/fuzz.sh does). Checked with
-fsyntax-only (every check and instantiation, no code generated), not linked:
a snippet may declare a worker's methods without defining them. Conventions:

  * Every unit starts with #include "procpool/procpool.h", <cstdint>, <cstdio>, <ranges>, <string>
    and <vector>; a snippet may assume them.
  * A block that defines `main`, or has a line starting with `#include`, `namespace` or
    `template`, is compiled as written, at namespace scope. Any other block is wrapped in a
    function body (`void snippet() { ... }`): statements and local classes are fine there.
  * An HTML comment on the line(s) just before the opening fence changes that:
      <!-- snippet: fragment -->   the block is not compiled (keep these rare);
      <!-- snippet: continues -->  the block joins the previous block's unit, after it (for a
                                   section written as one sequence of statements);
      <!-- snippet: setup
      code -->                     `code` is put before the block, at namespace scope: what the
                                   block assumes from an earlier example (like rustdoc's hidden
                                   lines). It is compiled with the block.
Errors point at the Markdown file and line (#line directives). Prints one line per unit and a
summary; exits non-zero if any unit does not compile.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELUDE = """#include "procpool/procpool.h"

#include <cstdint>
#include <cstdio>
#include <ranges>
#include <string>
#include <vector>
"""
# The prelude is compiled once into a precompiled header (g++ uses prelude.h.gch in its place
# where the flags match; -Winvalid-pch says so if they do not): parsing procpool.h is most of each
# unit's time, and there are a few dozen units.
PRELUDE_HEADER = "snippet_prelude.h"
FLAGS = ["-std=c++20", "-Wall", "-Wextra", "-Werror", "-Wno-unused-variable",
         "-Wno-unused-but-set-variable", "-Wno-unused-parameter",
         "-Wno-missing-field-initializers", "-Wno-unused-local-typedefs"]
TOP_LEVEL = re.compile(r"^\s*(int\s+main\s*\(|#include|namespace\b|template\b)")
MARKER = re.compile(r"<!--\s*snippet:\s*(fragment|continues|setup)\b(.*?)-->", re.S)


class Unit:
    def __init__(self, path, line):
        self.path = path
        self.line = line  # 1-based line of the first block's first code line
        self.blocks = []  # (first code line, [lines])
        self.setup = []   # (first line, [lines])

    def name(self):
        return "%s:%d" % (os.path.relpath(self.path, ROOT), self.line)

    def source(self):
        top = any(TOP_LEVEL.match(l) for _, lines in self.blocks for l in lines)
        out = ['#include "%s"\n' % PRELUDE_HEADER]
        rel = os.path.relpath(self.path, ROOT)
        for first, lines in self.setup:
            out.append('#line %d "%s"' % (first, rel))
            out.extend(lines)
        if not top:
            out.append("void snippet() {")
        for first, lines in self.blocks:
            out.append('#line %d "%s"' % (first, rel))
            out.extend(lines)
        if not top:
            out.append("}")
        return "\n".join(out) + "\n"


def extract(path):
    """Returns (units, fragments) of one Markdown file."""
    with open(path) as f:
        lines = f.read().split("\n")
    units, fragments = [], 0
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```cpp":
            i += 1
            continue
        # The marker, if any: an HTML comment ending on the last non-blank line before the fence.
        kind, setup = None, None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and lines[j].rstrip().endswith("-->"):
            k = j
            while k >= 0 and "<!--" not in lines[k]:
                k -= 1
            m = MARKER.search("\n".join(lines[k:j + 1]))
            if m:
                kind = m.group(1)
                if kind == "setup":
                    text = m.group(2)
                    body = text.split("\n")[1:]  # the code starts on the line after "setup"
                    setup = (k + 2, body)
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        block = (start + 1, lines[start:end])
        i = end + 1
        if kind == "fragment":
            fragments += 1
            continue
        if kind == "continues":
            if not units:
                raise SystemExit("%s:%d: 'continues' with no block before it" % (path, start))
            units[-1].blocks.append(block)
            continue
        unit = Unit(path, start + 1)
        unit.blocks.append(block)
        if setup:
            unit.setup.append(setup)
        units.append(unit)
    return units, fragments


def include_flags(workdir, gen):
    return ["-I" + workdir, "-I" + os.path.join(ROOT, "include"), "-I" + gen]


def precompile_prelude(workdir, gen):
    """Writes the prelude header and its .gch beside it; returns g++'s output if that failed."""
    header = os.path.join(workdir, PRELUDE_HEADER)
    with open(header, "w") as f:
        f.write(PRELUDE)
    cmd = ["g++"] + FLAGS + include_flags(workdir, gen) + ["-x", "c++-header", header,
                                                           "-o", header + ".gch"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return None if done.returncode == 0 else done.stdout


def compile_unit(unit, workdir, index, gen):
    src = os.path.join(workdir, "snippet_%03d.cc" % index)
    with open(src, "w") as f:
        f.write(unit.source())
    # -fsyntax-only: every check of the language and every template instantiation the unit
    # needs, without generating code (a third less time; nothing is linked anyway).
    cmd = ["g++"] + FLAGS + include_flags(workdir, gen) + ["-Winvalid-pch", "-fsyntax-only", src]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return unit, done.returncode, done.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--keep", help="write the generated sources to this directory")
    args = parser.parse_args()
    files = args.files or [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "guide.md")]

    units, fragments = [], 0
    for path in files:
        u, f = extract(os.path.abspath(path))
        units += u
        fragments += f

    workdir = args.keep or tempfile.mkdtemp(prefix="procpool-snippets-")
    os.makedirs(workdir, exist_ok=True)
    try:
        # The generated header goes where the headers include it from: procpool/internal/.
        gen = os.path.join(workdir, "gen")
        os.makedirs(os.path.join(gen, "procpool", "internal"), exist_ok=True)
        subprocess.run(["capnp", "compile", "-I/usr/include",
                        "-oc++:" + os.path.join(gen, "procpool", "internal"),
                        "--src-prefix=" + os.path.join(ROOT, "lib", "wire"),
                        os.path.join(ROOT, "lib", "wire", "protocol.capnp")], check=True)
        trouble = precompile_prelude(workdir, gen)
        if trouble is not None:
            print("FAILED  the prelude (%s)\n%s" % (PRELUDE_HEADER, trouble))
            return 1
        failed = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            jobs = [pool.submit(compile_unit, u, workdir, n, gen) for n, u in enumerate(units)]
            for job in jobs:
                unit, rc, output = job.result()
                if rc == 0:
                    print("ok      %s" % unit.name())
                else:
                    failed += 1
                    print("FAILED  %s\n%s" % (unit.name(), output))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("snippets: %d compiled, %d failed, %d fragments not compiled"
          % (len(units) - failed, failed, fragments))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
