"""PNG charts with no plotting library: a small RGB canvas, lines, bars, a digit font for tick labels,
and a PNG encoder (zlib + CRC from the standard library). Legends and titles live in the HTML page
around each image, where text renders better than in pixels."""
import struct
import zlib
from typing import Sequence

RGB = tuple[int, int, int]
WHITE, GRID, AXIS, INK = (255, 255, 255), (228, 228, 228), (90, 90, 90), (40, 40, 40)
PALETTE: list[RGB] = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                      (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
STATUS_COLORS: dict[str, RGB] = {"ok": (44, 160, 44), "compile_error": (255, 127, 14), "incorrect": (214, 39, 40),
                                 "timeout": (148, 103, 189), "crashed": (140, 86, 75), "rejected": (127, 127, 127)}

# 3x5 glyphs, rows top to bottom, 3 bits each (left bit first): enough for tick labels.
FONT = {"0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
        "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
        ".": (0, 0, 0, 0, 2), "x": (0, 5, 2, 5, 0), "-": (0, 0, 7, 0, 0), ":": (0, 2, 0, 2, 0), " ": (0, 0, 0, 0, 0)}


class Canvas:
    def __init__(self, width: int, height: int, background: RGB = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))  # [height, width, 3]

    def dot(self, x: int, y: int, color: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i:i + 3] = bytes(color)

    def rect(self, x: int, y: int, w: int, h: int, color: RGB) -> None:
        for yy in range(max(y, 0), min(y + h, self.height)):
            start, end = max(x, 0), min(x + w, self.width)
            if end > start:
                i = (yy * self.width + start) * 3
                self.pixels[i:i + (end - start) * 3] = bytes(color) * (end - start)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: RGB, width: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x, y = round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)
            self.rect(x - width // 2, y - width // 2, width, width, color)

    def text(self, x: int, y: int, text: str, color: RGB = INK, scale: int = 2) -> None:
        for ch in text:
            for row, bits in enumerate(FONT.get(ch, FONT[" "])):
                for col in range(3):
                    if bits & (4 >> col):
                        self.rect(x + col * scale, y + row * scale, scale, scale, color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def read_png(data: bytes) -> Canvas:
    """Decode a PNG this module wrote (8-bit RGB, filter 0): for tests that look at the pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    canvas = Canvas(width, height)
    stride = width * 3 + 1
    canvas.pixels = bytearray(b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height)))
    return canvas


def colors_in(canvas: Canvas) -> set[RGB]:
    p = canvas.pixels
    return {(p[i], p[i + 1], p[i + 2]) for i in range(0, len(p), 3)}


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def line_chart(series: Sequence[tuple[RGB, Sequence[tuple[float, float]]]], width: int = 720, height: int = 320,
               y_floor: float | None = None, x_label=lambda x: f"{x:.0f}", until: float | None = None) -> bytes:
    """Steps of (x, y) per series: a value holds until the next point (a speedup holds until the next
    deploy), and the last one until `until` (now) when given."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 56, 16, 12, 30
    points = [p for _, pts in series for p in pts]
    if not points:
        return canvas.png()
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs + ([until] if until is not None else []))
    x1 = x1 if x1 > x0 else x0 + 1
    y0 = min(ys + ([y_floor] if y_floor is not None else []))
    y1 = max(ys)
    pad = (y1 - y0) * 0.1 or 0.5
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + int((x - x0) / (x1 - x0) * (width - left - right))  # noqa: E731
    sy = lambda y: height - bottom - int((y - y0) / (y1 - y0) * (height - top - bottom))  # noqa: E731
    for y in _ticks(y0, y1):
        canvas.line(left, sy(y), width - right, sy(y), GRID)
        canvas.text(4, sy(y) - 5, f"{y:.2f}x")
    for x in _ticks(x0, x1, 3):
        label = x_label(x)
        canvas.text(min(max(sx(x) - 4 * len(label), left), width - 8 * len(label)), height - bottom + 8, label)
    canvas.line(left, top, left, height - bottom, AXIS)
    canvas.line(left, height - bottom, width - right, height - bottom, AXIS)
    if y_floor is not None and y0 < y_floor < y1:
        canvas.line(left, sy(y_floor), width - right, sy(y_floor), AXIS)  # the incumbent, 1.0x
    for color, pts in series:
        pts = sorted(pts)
        for (xa, ya), (xb, _) in zip(pts, pts[1:] + [(x1, None)]):
            canvas.line(sx(xa), sy(ya), sx(xb), sy(ya), color, 2)
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            canvas.line(sx(xb), sy(ya), sx(xb), sy(yb), color, 2)
        for x, y in pts:
            canvas.rect(sx(x) - 3, sy(y) - 3, 7, 7, color)
    return canvas.png()


def stacked_bars(bars: Sequence[Sequence[tuple[RGB, float]]], width: int = 720, height: int = 320) -> bytes:
    """One bar per entry, each a stack of (color, value) segments, bottom first."""
    canvas = Canvas(width, height)
    left, right, top, bottom = 40, 16, 12, 24
    top_value = max((sum(v for _, v in bar) for bar in bars), default=0) or 1
    step = max(1, -(-int(top_value) // 4))  # whole-number ticks: these are counts
    total = step * -(-int(top_value) // step)
    for y in range(0, total + 1, step):
        py = height - bottom - int(y / total * (height - top - bottom))
        canvas.line(left, py, width - right, py, GRID)
        canvas.text(4, py - 5, f"{y:.0f}")
    canvas.line(left, top, left, height - bottom, AXIS)
    canvas.line(left, height - bottom, width - right, height - bottom, AXIS)
    slot = (width - left - right) / max(len(bars), 1)
    for i, bar in enumerate(bars):
        x, base = left + int(i * slot + slot * 0.15), height - bottom
        w = max(int(slot * 0.7), 1)
        for color, value in bar:
            h = int(value / total * (height - top - bottom))
            canvas.rect(x, base - h, w, h, color)
            base -= h
        canvas.text(x, height - bottom + 6, str(i + 1))
    return canvas.png()
