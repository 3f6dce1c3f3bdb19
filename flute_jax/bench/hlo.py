"""The ops of a compiled XLA module, read from its optimized HLO text.

Used to show what each benchmarked function turned into (on CPU and GPU alike): e.g.
``fusion(kLoop)`` + ``custom-call(__cublas$gemm)`` says the dequantized weight was
written to memory before the GEMM, and exactly one matmul per module shows XLA had no
two dots to merge.
"""

from __future__ import annotations

import re

# Instructions that launch nothing.
_FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "copy-start", "copy-done"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r"kind=(k\w+)")
_FUSION_KIND = re.compile(r'"kind":"([^"]+)"')


def entry_ops(hlo_text: str) -> list[str]:
    """Ops of the ENTRY computation, in order, e.g. ``["fusion(kLoop)", "custom-call(flute_qgemm)"]``."""
    ops, inside = [], False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            inside = True
            continue
        if inside and line.startswith("}"):
            break
        if not inside:
            continue
        m = _INSTR.match(line)
        if not m or m.group(1) in _FREE:
            continue
        op, rest = m.group(1), m.group(2)
        detail = None
        if op == "custom-call":
            t = _TARGET.search(rest)
            detail = t.group(1) if t else None
        elif op == "fusion":
            k = _KIND.search(rest)
            fk = _FUSION_KIND.search(rest)
            detail = "/".join(x for x in (k.group(1) if k else None, fk.group(1) if fk else None) if x)
        ops.append(f"{op}({detail})" if detail else op)
    return ops
