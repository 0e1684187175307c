"""Reading a kernel's SASS (cuobjdump --dump-sass text) for fastvq.triton.compile_check: where the code-tile
loop is, how many instructions one trip through it takes (all of it, or the path that skips a block), and
how many wgmma groups its waits leave in flight."""
from __future__ import annotations

import re

# The dot's instructions, by which the main loop is found in the SASS.
_DOT = re.compile(r"\b(HGMMA|HMMA|FFMA)\b")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")
_WGMMA_WAIT = re.compile(r"/\*([0-9a-f]{4,})\*/\s+WARPGROUP\.DEPBAR\.LE\s+gsb0,\s+0x([0-9a-f]+)")


def _loops(sass: str) -> list[tuple[int, int]]:
    """(target, branch) addresses of the conditional backward branches."""
    return [(int(m.group(3), 16), int(m.group(1), 16)) for m in _BRANCH.finditer(sass)
            if m.group(2) and m.group(3) and int(m.group(3), 16) < int(m.group(1), 16)]


def _forward_branches(sass: str) -> list[tuple[int, int]]:
    """(branch, target) addresses of the conditional forward branches."""
    return [(int(m.group(1), 16), int(m.group(3), 16)) for m in _BRANCH.finditer(sass)
            if m.group(2) and m.group(3) and int(m.group(3), 16) > int(m.group(1), 16)]


def main_loop(sass: str) -> tuple[int, int] | None:
    """(first, last) address of the code-tile loop's body: the innermost loop around the most dot
    instructions, a loop being a conditional backward branch (an unconditional one jumps back from an
    out-of-line path, such as an mbarrier wait's retry); None if there is none."""
    loops = _loops(sass)
    found = {}
    for line in sass.splitlines():
        dot, instruction = _DOT.search(line), _INSTRUCTION.search(line)
        if dot and instruction:
            found.setdefault(dot.group(1), []).append(int(instruction.group(1), 16))
    # The tensor-core dot when there is one (FFMA also appear in its epilogues), else FFMA.
    dots = next((found[name] for name in ("HGMMA", "HMMA", "FFMA") if name in found), None)
    if not dots:
        return None

    def dot_count(loop):
        return sum(loop[0] <= a <= loop[1] for a in dots)

    with_dots = [loop for loop in loops if dot_count(loop)]
    if not with_dots:
        return None
    most = max(dot_count(loop) for loop in with_dots)
    return min((loop for loop in with_dots if dot_count(loop) == most), key=lambda loop: loop[1] - loop[0])


def main_loop_instructions(sass: str, d_slices: int, skipping: bool = False) -> int | None:
    """Instructions per iteration of the code-tile loop (module docstring), or None if not found. With
    ``skipping``, on the path that takes the loop's longest forward conditional branch (nearest_codes: a
    tile that enters no row's list skips its top-k and merge)."""
    addresses = [int(m.group(1), 16) for m in _INSTRUCTION.finditer(sass)]
    inner = main_loop(sass)
    if inner is None:
        return None

    def size(loop):
        return sum(loop[0] <= a <= loop[1] for a in addresses)

    if skipping:
        skips = [(branch, target) for branch, target in _forward_branches(sass)
                 if inner[0] <= branch < target <= inner[1]]
        longest = max(skips, key=lambda skip: size((skip[0] + 1, skip[1] - 1)), default=None)
        return size(inner) - (size((longest[0] + 1, longest[1] - 1)) if longest else 0)

    outer = [loop for loop in _loops(sass) if loop[0] <= inner[0] and inner[1] <= loop[1] and loop != inner]
    if d_slices > 1 and outer:
        enclosing = min(outer, key=size)
        return size(enclosing) - size(inner) + d_slices * size(inner)
    return size(inner)


def main_loop_wgmma_waits(sass: str) -> list[int]:
    """The wgmma groups each ``WARPGROUP.DEPBAR.LE gsb0, n`` in the main loop leaves in flight (its n)."""
    loop = main_loop(sass)
    if loop is None:
        return []
    return [int(m.group(2), 16) for m in _WGMMA_WAIT.finditer(sass) if loop[0] <= int(m.group(1), 16) <= loop[1]]
