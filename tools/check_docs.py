#!/usr/bin/env python3
"""Checks that docs/guide.md says what the headers and the README say. Run by tools/docs.sh.

Usage: python3 tools/check_docs.py [--self-test]

1. Field order. Each ```cpp block of the guide preceded by `<!-- fields: STRUCT HEADER -->` must
   designate every data member of `struct STRUCT` in HEADER, in declaration order, each with the
   header's default (compared without `procpool::` qualifiers; a member without an initializer
   is shown as `{}`). A wrong order is a compile error users hit, so the guide must be exact.
2. The error table. The guide's table under "Errors: one code per cause" must be the README's,
   line for line: the README's is the truth.

Prints each problem and exits non-zero if there is any.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS_MARKER = re.compile(r"<!--\s*fields:\s*(\w+)\s+(\S+)\s*-->")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def normalize(value):
    value = re.sub(r"\s+", " ", value.strip())
    value = value.replace("procpool::", "")
    return value or "{}"


def struct_fields(header_text, name):
    """[(member, default)] of `struct name { ... };` in declaration order: data members only."""
    text = strip_comments(header_text)
    m = re.search(r"\bstruct\s+%s\s*\{" % re.escape(name), text)
    if not m:
        raise ValueError("no `struct %s {`" % name)
    i, depth = m.end(), 1
    statements, current = [], []
    # Characters at depth 1 form statements, ended by ';', or by the '}' that closes a function
    # body. Braces of an initializer are kept in its statement.
    nested, body = [], False
    while i < len(text) and depth > 0:
        c = text[i]
        if c == "{":
            depth += 1
            if depth == 2:
                nested = ["{"]
                body = bool(re.search(r"\)\s*(const|noexcept|override|final|\s)*$",
                                      "".join(current)))
            else:
                nested.append(c)
        elif c == "}":
            depth -= 1
            if depth == 1:
                nested.append("}")
                if body:
                    statements.append("".join(current) + "()")
                    current = []
                else:
                    current.append("".join(nested))
            elif depth > 1:
                nested.append(c)
        elif depth == 1:
            if c == ";":
                statements.append("".join(current))
                current = []
            else:
                current.append(c)
        else:
            nested.append(c)
        i += 1
    fields = []
    for statement in statements:
        s = re.sub(r"^\s*(public|private|protected)\s*:", "", statement).strip()
        if not s or re.match(r"(using|static|friend|enum|struct|class|template|typedef)\b", s):
            continue
        declarator, _, default = s.partition("=")
        declarator = declarator.strip()
        if "{" in declarator:  # `T name{...}` initialization
            declarator, _, brace = declarator.partition("{")
            default = "{" + brace
        if re.search(r"\)\s*(const)?\s*(noexcept)?\s*$", declarator):
            continue  # a function
        member = re.search(r"(\w+)\s*$", declarator)
        if member:
            fields.append((member.group(1), normalize(default)))
    return fields


def guide_fields(block):
    """[(member, value)] of the designators `.name = value,` in a block, in order."""
    body = block[block.index("{") + 1:block.rindex("}")]
    out = []
    for m in re.finditer(r"\.(\w+)\s*=\s*", body):
        start = m.end()
        depth, i = 0, start
        while i < len(body):
            c = body[i]
            if c in "({[":
                depth += 1
            elif c in ")}]":
                depth -= 1
            elif c == "," and depth == 0:
                break
            i += 1
        out.append((m.group(1), normalize(body[start:i])))
    return out


def check_fields(guide_lines, headers=None):
    problems = []
    for n, line in enumerate(guide_lines):
        m = FIELDS_MARKER.search(line)
        if not m:
            continue
        name, header = m.group(1), m.group(2)
        if n + 1 >= len(guide_lines) or guide_lines[n + 1].strip() != "```cpp":
            problems.append("docs/guide.md:%d: a fields marker must precede a ```cpp block"
                            % (n + 1))
            continue
        end = n + 2
        while end < len(guide_lines) and guide_lines[end].strip() != "```":
            end += 1
        block = "\n".join(guide_lines[n + 2:end])
        if headers is not None:
            expected = struct_fields(headers[header], name)
        else:
            with open(os.path.join(ROOT, header)) as f:
                expected = struct_fields(f.read(), name)
        found = guide_fields(block)
        if [f for f, _ in found] != [f for f, _ in expected]:
            problems.append(
                "docs/guide.md:%d: %s's fields in %s are, in order:\n    %s\n"
                "  the guide lists:\n    %s"
                % (n + 2, name, header, ", ".join(f for f, _ in expected),
                   ", ".join(f for f, _ in found)))
            continue
        for (field, want), (_, got) in zip(expected, found):
            if got != want and not got.endswith("::" + want):
                problems.append("docs/guide.md:%d: %s::%s defaults to `%s` in %s, the guide "
                                "says `%s`" % (n + 2, name, field, want, header, got))
    return problems


def error_table(text):
    lines = text.split("\n")
    heading = next((i for i, l in enumerate(lines)
                    if re.match(r"#+ Errors: one code per cause", l)), None)
    if heading is None:
        return None
    start = next((i for i in range(heading, len(lines)) if lines[i].startswith("| cause |")), None)
    if start is None:
        return None
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def check_table(readme, guide):
    want, got = error_table(readme), error_table(guide)
    if want is None:
        return ["README.md: no table under \"Errors: one code per cause\""]
    if got != want:
        return ["docs/guide.md: the table under \"Errors: one code per cause\" differs from the "
                "README's; copy it exactly"]
    return []


def self_test():
    header = """
    struct Opt {
      // A comment with a; semicolon and = sign.
      int a = 1;
      std::function<void(int x)> f;
      std::vector<int> v = {1, 2};
      bool ok() const { return a > 0; }
      Opt() = default;
      absl::Duration d = absl::Seconds(3);
      size_t n = size_t{256} << 20;
      int b{7};
      void g() { if (a) { a = 2; } }
      std::string s;
    };"""
    want = [("a", "1"), ("f", "{}"), ("v", "{1, 2}"), ("d", "absl::Seconds(3)"),
            ("n", "size_t{256} << 20"), ("b", "{7}"), ("s", "{}")]
    assert struct_fields(header, "Opt") == want, struct_fields(header, "Opt")
    block = ("Opt o = {\n .a = 1,\n .f = {},\n .v = {1, 2},\n .d = absl::Seconds(3),\n"
             " .n = size_t{256} << 20,\n .b = {7},\n .s = {},\n};")
    assert guide_fields(block) == want, guide_fields(block)
    wrong = [("docs", "<!-- fields: Opt h -->"), ("", "```cpp"), ("", "Opt o = {.f = {}, .a = 1};"),
             ("", "```")]
    assert check_fields([l for _, l in wrong], headers={"h": header})
    print("check_docs: self-test passed")


def main():
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return 0
    with open(os.path.join(ROOT, "docs", "guide.md")) as f:
        guide = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    problems = check_fields(guide.split("\n")) + check_table(readme, guide)
    markers = len(FIELDS_MARKER.findall(guide))
    for p in problems:
        print(p)
    if problems:
        print("check_docs: %d problem(s) in docs/guide.md" % len(problems))
    else:
        print("check_docs: %d field lists as in the headers, the error table as in the README"
              % markers)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
