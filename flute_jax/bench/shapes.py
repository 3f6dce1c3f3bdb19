"""Benchmark shapes: Llama-3 presets with tensor-parallel splits, explicit ``KxN`` lists.

K is in features, N out features (the weight is ``[K, N]``, Flax layout). Column-parallel
layers (qkv, fused gate/up) split N across ``tp`` devices; row-parallel layers (o, down)
split K. Gate and up are benchmarked as one fused ``[K, 2 * intermediate]`` weight, the
way a serving stack runs them.
"""

from __future__ import annotations

import dataclasses
import re

# name -> (hidden, qkv out features, intermediate); qkv = (heads + 2 * kv_heads) * 128.
LLAMA3 = {
    "llama3-8b": (4096, 6144, 14336),
    "llama3-70b": (8192, 10240, 28672),
    "llama3-405b": (16384, 18432, 53248),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One weight shape: ``K`` in features, ``N`` out features, and a label."""

    k: int
    n: int
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.k}x{self.n}"


def llama3_shapes(model: str, tp: int) -> list[Shape]:
    """The 4 linear layers of one Llama-3 block on one of ``tp`` tensor-parallel ranks."""
    if model not in LLAMA3:
        raise ValueError(f"unknown shape preset {model!r}; choose from {', '.join(LLAMA3)}")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel degree must be a positive integer, got {tp!r}")
    hidden, qkv, inter = LLAMA3[model]
    layers = [  # (layer, K, N, split along)
        ("qkv", hidden, qkv, "n"),
        ("o", hidden, hidden, "k"),
        ("gate_up", hidden, 2 * inter, "n"),
        ("down", inter, hidden, "k"),
    ]
    out = []
    for layer, k, n, axis in layers:
        size = n if axis == "n" else k
        if size % tp:
            raise ValueError(f"{model} {layer}: {'N' if axis == 'n' else 'K'}={size} is not divisible by tp={tp}")
        if axis == "n":
            n //= tp
        else:
            k //= tp
        out.append(Shape(k, n, f"{model} {layer} tp{tp}"))
    return out


_KN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_kn(text: str) -> list[Shape]:
    """``"4096x4096,8192x28672"`` -> shapes. Raises ValueError on anything else."""
    shapes = []
    for item in text.split(","):
        match = _KN.match(item)
        if not match:
            raise ValueError(f"--kn expects comma-separated KxN pairs like 4096x4096, got {item.strip()!r}")
        k, n = int(match.group(1)), int(match.group(2))
        if k < 1 or n < 1:
            raise ValueError(f"--kn sizes must be >= 1, got {item.strip()!r}")
        shapes.append(Shape(k, n))
    return shapes


def resolve_shapes(presets: list[str], tps: list[int], kn: list[Shape]) -> list[Shape]:
    """Presets x TP degrees, then explicit shapes; duplicates (same K, N) are kept once."""
    shapes = [s for model in presets for tp in tps for s in llama3_shapes(model, tp)] + list(kn)
    seen, unique = set(), []
    for s in shapes:
        if (s.k, s.n) not in seen:
            seen.add((s.k, s.n))
            unique.append(s)
    return unique
