#!/usr/bin/env python3
"""Checks the layout rules of RFD 0001: no import circle between the source
files of a crate, and no product source file over 450 lines.

A file depends on another when it names an item of that file's module:
`crate::a::b`, `super::x`, `self::x` or a child module `x::` declared in
it, in a `use` or in an expression. Each path is resolved to the longest
prefix that is a module file, so `crate::server::Shared` depends on
`server/mod.rs` and `crate::server::admin::serve` on `server/admin.rs`.
A parent that declares `mod child;` does not depend on it by declaring
it; a parent that names an item of its child does. Test modules
(`#[cfg(test)]`) are left out: they may reach into what they test.

Prints each circle and each long file, and exits 1 if there is one.
Usage: scripts/check-layout.py [crate-src-dir ...]
"""

import os
import re
import sys

DEFAULT_ROOTS = ["proto/src", "daemon/src", "daemon/audit/src", "daemon/cli/src", "agent/src", "tests/src"]
# The product crates, whose files are held to MAX_LINES.
PRODUCT_ROOTS = ["proto/src", "daemon/src", "daemon/audit/src", "daemon/cli/src", "agent/src"]
MAX_LINES = 450

PATH = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_][A-Za-z0-9_]*)+|[a-z_][a-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)+)")
MOD_DECL = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", re.M)
USE_GROUP = re.compile(r"\buse\s+((?:crate|super|self|[a-z_][a-z0-9_]*)(?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}\s*;", re.S)


def modules(root):
    """Module path (tuple) -> file, for every .rs file under root."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            if parts and parts[0] == "bin":
                continue  # each binary is a crate of its own
            found[tuple(parts)] = os.path.join(root, rel)
    return found


def product_text(path):
    """The file without comments, string literals and its test modules."""
    text = open(path, encoding="utf-8").read()
    cut = re.search(r"^#\[cfg\(test\)\]\s*\n\s*(?:pub\s+)?mod\s+\w+\s*\{", text, re.M)
    if cut:
        text = text[: cut.start()]
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def expand_groups(text):
    """`use a::{b, c::d}` as the paths a::b and a::c::d (one level)."""
    paths = []
    for m in USE_GROUP.finditer(text):
        for item in re.split(r",", m.group(2)):
            item = item.strip().split(" as ")[0].strip().strip("{}").strip()
            if item and item != "self" and re.match(r"[A-Za-z_]", item):
                paths.append(m.group(1) + "::" + item.split("::{")[0])
    return paths


def reexports(text):
    """Names a file re-exports (`pub use a::b::X;`, `pub use a::{X, Y};`),
    each with the path it comes from."""
    out = {}
    for m in re.finditer(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]*);", text, re.S):
        body = re.sub(r"\s+", "", re.sub(r"\s+as\s+", "@", m.group(1)))
        if "::" not in body:
            continue  # a crate under another name
        group = re.match(r"(.*)::\{(.*)\}$", body)
        items = [(group.group(1), i) for i in group.group(2).split(",")] if group else [tuple(body.rsplit("::", 1))]
        for base, item in items:
            name, _, alias = item.partition("@")
            if name and name != "self" and "{" not in name:
                out[alias or name.split("::")[-1]] = base + "::" + name
    return out


def resolve(segments, here, mods, exported=None, depth=0):
    """The module file a path's items live in, or None if outside the crate.
    A name that a module only re-exports resolves to where it is defined."""
    head, rest = segments[0], segments[1:]
    if head == "crate":
        base = ()
    elif head == "super":
        base = here[:-1]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif head == "self":
        base = here
    elif here + (head,) in mods:
        base, rest = here + (head,), rest
    else:
        return None  # another crate, std, or a local name
    best = base
    for i in range(len(rest)):
        if base + tuple(rest[: i + 1]) in mods:
            best = base + tuple(rest[: i + 1])
        else:
            break
    if best not in mods:
        return None
    used = rest[len(best) - len(base) :]
    if exported and used and depth < 8:
        origin = exported.get(best, {}).get(used[0])
        if origin:
            again = resolve(origin.split("::") + used[1:], best, mods, exported, depth + 1)
            if again is not None:
                return again
    return best


def graph(root):
    mods = modules(root)
    edges = {m: set() for m in mods}
    exported = {m: reexports(product_text(path)) for m, path in mods.items()}
    for here, path in mods.items():
        text = product_text(path)
        paths = [m.group(1) for m in PATH.finditer(text)] + expand_groups(text)
        for p in paths:
            target = resolve(p.split("::"), here, mods, exported)
            if target is not None and target != here:
                edges[here].add(target)
    return mods, edges


def cycles(edges):
    """Strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    roots = sys.argv[1:] or DEFAULT_ROOTS
    found = 0
    for root in roots:
        mods, edges = graph(root)
        for comp in cycles(edges):
            found += 1
            names = [os.path.relpath(mods[m]) for m in comp]
            print(f"import circle in {root}: " + " <-> ".join(names))
            for m in comp:
                inside = sorted(os.path.relpath(mods[t]) for t in edges[m] if t in comp)
                print(f"  {os.path.relpath(mods[m])} uses {', '.join(inside)}")
    long_files = 0
    for root in roots:
        if root not in PRODUCT_ROOTS:
            continue
        paths = (os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".rs"))
        for path in sorted(paths):
            lines = sum(1 for _ in open(path, encoding="utf-8"))
            if lines > MAX_LINES:
                long_files += 1
                print(f"{os.path.relpath(path)} has {lines} lines (at most {MAX_LINES}); split it by idea")
    if found:
        print(f"{found} import circle(s); move what both sides need into a module both import")
    if found or long_files:
        return 1
    print(f"no import circles in {', '.join(roots)}; no product file over {MAX_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
