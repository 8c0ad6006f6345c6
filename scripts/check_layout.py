#!/usr/bin/env python3
"""The layout rules of the workspace, checked: no Rust source file over 600
lines, and no import circle between files (no file imports, through `use` or a
`crate::`/`super::` path, a file that imports it back, directly or around a
longer loop). A module declaring its children (`mod x;`) is not an import.

    python3 scripts/check_layout.py      # exit 1 and a list when a rule is broken
"""
import glob
import os
import re
import sys

MAX_LINES = 600
CRATES = {"common": "common/src", "dispatcher": "dispatcher/src", "sdxl": "sdxl/src",
          "worker": "worker/src", "e2e-tests": "tests/src"}


def module_files(src):
    """{module path tuple: file} of one crate (lib.rs/main.rs are the root)."""
    files = {}
    for root, _, names in os.walk(src):
        for name in names:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            files.setdefault(tuple(rel), []).append(path)
    return files


def strip_comments(text):
    """Comments and the unit-test module (its `super::*` is the file itself)."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.split(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))?\s+)?mod\s+tests\s*\{", text)[0]


def paths_in(text):
    """Every `crate::…`, `super::…` and `self::…` path, `use` trees expanded."""
    out = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        out.extend(expand(m.group(1).replace("\n", " ")))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
        out.append(m.group(1).split("::"))
    return out


def expand(tree):
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)::\{(.*)\}$", tree)
    if not m:
        return [tree.split(" as ")[0].split("::")]
    prefix, inner = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    out = []
    for p in filter(None, parts):
        out.extend(expand(f"{prefix}::{p}"))
    return out


def resolve(path, here, files):
    """The module file a path leads to (the longest existing module prefix)."""
    if path[0] == "crate":
        base, rest = (), path[1:]
    elif path[0] in ("super", "self"):
        base, rest = here, path
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    else:
        return None
    mod = tuple(base)
    best = mod if mod in files else None
    for part in rest:
        mod = mod + (part,)
        if mod in files:
            best = mod
    return best


def main():
    problems = []
    for crate, src in CRATES.items():
        if not os.path.isdir(src):
            continue
        files = module_files(src)
        edges = {}
        for mod, paths in files.items():
            for path in paths:
                text = open(path).read()
                lines = text.count("\n")
                if lines > MAX_LINES:
                    problems.append(f"{path}: {lines} lines (at most {MAX_LINES})")
                here = mod
                for p in paths_in(strip_comments(text)):
                    target = resolve(p, here, files)
                    if target is not None and target != mod:
                        edges.setdefault(path, set()).update(files[target])
        # cycles: depth-first search over file edges
        state, stack = {}, []

        def visit(node):
            state[node] = 1
            stack.append(node)
            for nxt in sorted(edges.get(node, ())):
                if nxt == node:
                    continue
                if state.get(nxt) == 1:
                    loop = stack[stack.index(nxt):] + [nxt]
                    problems.append("import circle: " + " -> ".join(loop))
                elif state.get(nxt) is None:
                    visit(nxt)
            stack.pop()
            state[node] = 2

        for node in sorted(edges):
            if state.get(node) is None:
                visit(node)
    kernels = sorted(glob.glob("sdxl/kernels/*.cu") + glob.glob("sdxl/kernels/*.cuh"))
    for extra in kernels + ["dispatcher/web/app.js"]:
        if os.path.exists(extra):
            lines = open(extra).read().count("\n")
            if lines > MAX_LINES:
                problems.append(f"{extra}: {lines} lines (at most {MAX_LINES})")
    for root in ["common/tests", "sdxl/tests", "worker/tests", "tests/tests", "dispatcher/tests"]:
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.endswith(".rs"):
                lines = open(path).read().count("\n")
                if lines > MAX_LINES:
                    problems.append(f"{path}: {lines} lines (at most {MAX_LINES})")
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print("layout: no import circle, no file over", MAX_LINES, "lines")


if __name__ == "__main__":
    main()
