"""A tiny 3x5 bitmap font, so plots carry labels without matplotlib or PIL fonts.

Lower case is drawn as upper case. Each glyph is five rows of three bits (MSB = left pixel).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["draw_text"]

_GLYPHS: dict[str, tuple[int, int, int, int, int]] = {
    "0": (7, 5, 5, 5, 7),
    "1": (2, 6, 2, 2, 7),
    "2": (7, 1, 7, 4, 7),
    "3": (7, 1, 3, 1, 7),
    "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7),
    "6": (7, 4, 7, 5, 7),
    "7": (7, 1, 2, 2, 2),
    "8": (7, 5, 7, 5, 7),
    "9": (7, 5, 7, 1, 7),
    "A": (2, 5, 7, 5, 5),
    "B": (6, 5, 6, 5, 6),
    "C": (3, 4, 4, 4, 3),
    "D": (6, 5, 5, 5, 6),
    "E": (7, 4, 6, 4, 7),
    "F": (7, 4, 6, 4, 4),
    "G": (3, 4, 5, 5, 3),
    "H": (5, 5, 7, 5, 5),
    "I": (7, 2, 2, 2, 7),
    "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5),
    "L": (4, 4, 4, 4, 7),
    "M": (5, 7, 7, 5, 5),
    "N": (6, 5, 5, 5, 5),
    "O": (2, 5, 5, 5, 2),
    "P": (6, 5, 6, 4, 4),
    "Q": (2, 5, 5, 6, 3),
    "R": (6, 5, 6, 5, 5),
    "S": (3, 4, 2, 1, 6),
    "T": (7, 2, 2, 2, 2),
    "U": (5, 5, 5, 5, 7),
    "V": (5, 5, 5, 5, 2),
    "W": (5, 5, 7, 7, 5),
    "X": (5, 5, 2, 5, 5),
    "Y": (5, 5, 2, 2, 2),
    "Z": (7, 1, 2, 4, 7),
    " ": (0, 0, 0, 0, 0),
    ".": (0, 0, 0, 0, 2),
    ",": (0, 0, 0, 2, 4),
    ":": (0, 2, 0, 2, 0),
    "-": (0, 0, 7, 0, 0),
    "+": (0, 2, 7, 2, 0),
    "_": (0, 0, 0, 0, 7),
    "/": (1, 1, 2, 4, 4),
    "=": (0, 7, 0, 7, 0),
    "(": (1, 2, 2, 2, 1),
    ")": (4, 2, 2, 2, 4),
    "%": (5, 1, 2, 4, 5),
    "<": (1, 2, 4, 2, 1),
    ">": (4, 2, 1, 2, 4),
    "|": (2, 2, 2, 2, 2),
    "*": (0, 5, 2, 5, 0),
    "#": (5, 7, 5, 7, 5),
    "'": (2, 2, 0, 0, 0),
    "!": (2, 2, 2, 0, 2),
    "?": (7, 1, 2, 0, 2),
    "[": (3, 2, 2, 2, 3),
    "]": (6, 2, 2, 2, 6),
    "^": (2, 5, 0, 0, 0),
    "&": (2, 5, 2, 5, 3),
}
_UNKNOWN = (7, 5, 5, 5, 7)


def draw_text(img: Tensor, text: str, x: int, y: int, color: Tensor, scale: int = 1) -> None:
    """Draw ``text`` into a (3,H,W) image in place, top-left corner at (x, y); clipped at the border."""
    h, w = img.shape[1:]
    color = color.to(img.dtype).view(3)
    cx = x
    for ch in text:
        rows = _GLYPHS.get(ch.upper(), _UNKNOWN)
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits >> (2 - c) & 1:
                    y0, x0 = y + r * scale, cx + c * scale
                    if 0 <= y0 < h and 0 <= x0 < w:
                        img[:, y0 : min(y0 + scale, h), x0 : min(x0 + scale, w)] = color.view(3, 1, 1)
        cx += 4 * scale
        if cx >= w:
            break


def text_width(text: str, scale: int = 1) -> int:
    return 4 * scale * len(text)
