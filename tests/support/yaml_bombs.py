"""Hostile YAML, built to size: alias bombs that try to fool the loader's alias budget."""

from __future__ import annotations


def laughs_through_redefined_anchors(levels: int, fan: int = 9) -> str:
    """Billion laughs where each level's mapping is the merged copy of a `<<` whose merge
    source `&t` redefines an anchor that was measured once (line 2 of each level): the
    old `t`, kept only by the anchor, is freed, and the next mapping built may take its
    place in memory (and its id)."""
    lines = ["u0: &u0 {" + ", ".join(f"k{i}: v" for i in range(fan)) + "}"]
    for level in range(1, levels + 1):
        aliases = ", ".join(f"a{i}: *u{level - 1}" for i in range(fan))
        lines += [
            f"p{level}: {{<<: &t {{z: 1}}}}",
            f"q{level}: {{<<: *t}}",
            f"r{level}: &u{level} {{<<: &t {{z: 2}}, {aliases}}}",
        ]
    return "\n".join([*lines, f"last: *u{levels}"]) + "\n"
