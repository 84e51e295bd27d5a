"""Reading images the way the labels see them: displayed orientation, RGB, 8-bit (no torch).

Two entry points:
- `probe_image(path)` reads only the header (JPEG SOF / PNG IHDR and their EXIF orientation) and the
  file's tail, so indexing 100k images does not decode 100k images. It raises `ImageReadError` for
  unreadable or truncated files and reports what will be converted (grayscale, alpha, 16-bit, EXIF).
- `read_image(path)` decodes to HxWx3 uint8 RGB with EXIF orientation applied by *our* header parser
  (OpenCV's own orientation handling is switched off), so the size `probe_image` reports and the pixels
  `read_image` returns can never disagree.

Corrupt JPEG scan data: libjpeg repairs it (grey blocks, shifted colours) and only prints an anonymous
"Corrupt JPEG data: ..." warning to the C stderr; `cv2.imdecode` still returns an image. The full check
(`probe_image(decode=True)`, what `dfineseg data check` runs) therefore captures file descriptor 2 around
the decode and turns those warnings into an `ImageReadError` naming the file. Limits: baseline JPEG has no
checksum, so a garbled stretch after which the Huffman decoder happens to resynchronise exactly is not
detectable by any decoder; and the capture is process-wide, so output other threads write to stderr during
that decode is held back and re-emitted afterwards.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dfineseg.infer.errors import UserError
from dfineseg.infer.preprocess import to_rgb_uint8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm")
MIN_IMAGE_SIDE = 16

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# libjpeg(-turbo) warnings that mean the pixels were repaired, not read (jerror.h JWRN_*); a bad ICC marker
# ("Corrupt JPEG data: bad ICC marker") damages colour metadata only, so it does not count.
_JPEG_CORRUPT_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
                          "Inconsistent progression sequence")
_STDERR_CAPTURE = threading.Lock()  # fd 2 is process-wide: two threads swapping it at once would lose it


class ImageReadError(UserError):
    """An image file that cannot be used (unreadable, truncated, too small); the message names the file."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class ImageInfo:
    """What the header says. `width`/`height` are the displayed (EXIF-applied) size."""

    width: int
    height: int
    orientation: int = 1
    conversions: list[str] = field(default_factory=list)


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block; 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    end = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", tiff[4:8])
        (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ = struct.unpack(end + "HH", entry[:4])
            if tag == 0x0112 and typ == 3:
                (value,) = struct.unpack(end + "H", entry[8:10])
                return int(value) if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def _probe_jpeg(f, path: Path) -> ImageInfo:
    f.seek(2)
    orientation = 1
    while True:
        byte = f.read(1)
        if not byte:
            raise ImageReadError(path, "truncated JPEG (no frame header found)")
        if byte != b"\xff":
            continue
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise ImageReadError(path, "truncated JPEG (no frame header found)")
        m = marker[0]
        if m in (0x01, 0xD8) or 0xD0 <= m <= 0xD7:
            continue
        raw_len = f.read(2)
        if len(raw_len) < 2:
            raise ImageReadError(path, "truncated JPEG header")
        (length,) = struct.unpack(">H", raw_len)
        payload = f.read(length - 2)
        if len(payload) < length - 2:
            raise ImageReadError(path, "truncated JPEG header")
        if m == 0xE1 and payload[:6] == b"Exif\x00\x00":
            orientation = _exif_orientation(payload[6:])
        elif m in _JPEG_SOF:
            precision, h, w, components = struct.unpack(">BHHB", payload[:6])
            conversions = []
            if components == 1:
                conversions.append("grayscale -> RGB")
            elif components == 4:
                conversions.append("CMYK -> RGB")
            if precision > 8:
                conversions.append(f"{precision}-bit -> 8-bit")
            return _oriented(w, h, orientation, conversions)
        elif m == 0xDA:
            raise ImageReadError(path, "JPEG scan starts before any frame header")


def _probe_png(f, path: Path) -> ImageInfo:
    f.seek(8)
    head = f.read(25)
    if len(head) < 25 or head[4:8] != b"IHDR":
        raise ImageReadError(path, "PNG without an IHDR header")
    w, h, depth, colour = struct.unpack(">IIBB", head[8:18])
    conversions = []
    if colour in (0, 4):
        conversions.append("grayscale -> RGB")
    if colour in (4, 6):
        conversions.append("alpha channel dropped")
    if depth == 16:
        conversions.append("16-bit -> 8-bit")
    orientation = 1
    f.seek(8)
    while True:  # look for an eXIf chunk before the image data
        chunk = f.read(8)
        if len(chunk) < 8:
            break
        length, kind = struct.unpack(">I4s", chunk)
        if kind == b"eXIf":
            orientation = _exif_orientation(f.read(length))
            break
        if kind in (b"IDAT", b"IEND"):
            break
        f.seek(length + 4, 1)
    return _oriented(w, h, orientation, conversions)


def _oriented(w: int, h: int, orientation: int, conversions: list[str]) -> ImageInfo:
    if orientation != 1:
        conversions.append(f"EXIF orientation {orientation} applied")
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo(int(w), int(h), orientation, conversions)


def _check_tail(f, path: Path, kind: str) -> None:
    f.seek(0, 2)
    size = f.tell()
    f.seek(max(0, size - 64))
    tail = f.read().rstrip(b"\x00")  # some writers pad with zeros after the end marker
    if kind == "jpeg" and not tail.endswith(b"\xff\xd9"):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    if kind == "png" and not tail.endswith(_PNG_IEND):
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")


def probe_image(path: str | Path, decode: bool = False) -> ImageInfo:
    """Header (+ tail) check of one image; `decode=True` also decodes it fully (slower, catches corrupt data).

    Raises `ImageReadError` for missing, unreadable, truncated or smaller-than-16-px images.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
            if magic[:2] == b"\xff\xd8":
                info = _probe_jpeg(f, path)
                _check_tail(f, path, "jpeg")
            elif magic == _PNG_SIGNATURE:
                info = _probe_png(f, path)
                _check_tail(f, path, "png")
            else:
                info = None
    except OSError as exc:
        raise ImageReadError(path, _open_error(path, exc)) from None
    if info is None or decode:
        img = _decode(path, strict=decode and magic[:2] == b"\xff\xd8")
        h, w = img.shape[:2]
        if info is None:
            conversions = []
            if img.ndim == 2:
                conversions.append("grayscale -> RGB")
            if img.dtype != np.uint8:
                conversions.append(f"{img.dtype} -> 8-bit")
            info = ImageInfo(w, h, 1, conversions)
        elif (h, w) != _stored_hw(info):
            raise ImageReadError(path, f"header says {info.width}x{info.height} but the pixels are {w}x{h}")
    if min(info.width, info.height) < MIN_IMAGE_SIDE:
        raise ImageReadError(path, f"image is {info.width}x{info.height}, smaller than {MIN_IMAGE_SIDE} px on a side")
    return info


def _stored_hw(info: ImageInfo) -> tuple[int, int]:
    """(H, W) of the pixels as stored, before the EXIF rotation."""
    if info.orientation in (5, 6, 7, 8):
        return info.width, info.height
    return info.height, info.width


def _open_error(path: Path, exc: OSError) -> str:
    if path.is_symlink() and not path.exists():
        return f"broken symlink: its target {os.readlink(path)} does not exist"
    return f"cannot open ({exc.strerror or exc})"


def _decode(path: Path, strict: bool = False) -> np.ndarray:
    """`strict`: also fail on the corrupt-data warnings libjpeg prints while repairing a JPEG."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, _open_error(path, exc)) from None
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if not data.size:
        img = None
    elif strict:
        img, warnings = _imdecode_capturing_stderr(data, flags)
        corrupt = [w for w in warnings if w.startswith(_JPEG_CORRUPT_WARNINGS) and "bad ICC marker" not in w]
        if corrupt:
            raise ImageReadError(path, f"corrupt JPEG data (libjpeg: {'; '.join(corrupt)})")
    else:
        img = cv2.imdecode(data, flags)
    if img is None or img.size == 0:
        raise ImageReadError(path, "not a readable image (OpenCV could not decode it)")
    return img


def _imdecode_capturing_stderr(data: np.ndarray, flags: int) -> tuple[np.ndarray | None, list[str]]:
    """cv2.imdecode, with what the C libraries print to fd 2 meanwhile returned as lines (not printed).

    Lines that are not libjpeg corruption warnings are written back to stderr. Without a usable fd 2
    (closed, or an embedding host that forbids dup) it decodes without capturing.
    """
    with _STDERR_CAPTURE, tempfile.TemporaryFile() as sink:  # the system temp folder, never the dataset
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return cv2.imdecode(data, flags), []
        os.dup2(sink.fileno(), 2)
        try:
            img = cv2.imdecode(data, flags)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        captured = sink.read().decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in captured.splitlines() if ln.strip()]
    others = [ln for ln in lines if not ln.startswith(_JPEG_CORRUPT_WARNINGS)]
    if others:
        print("\n".join(others), file=sys.stderr)
    return img, lines


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip stored pixels into the displayed orientation (EXIF tag values 1..8)."""
    if orientation == 2:
        return img[:, ::-1]
    if orientation == 3:
        return img[::-1, ::-1]
    if orientation == 4:
        return img[::-1]
    if orientation == 5:
        return img.swapaxes(0, 1)
    if orientation == 6:
        return img.swapaxes(0, 1)[:, ::-1]
    if orientation == 7:
        return img.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return img.swapaxes(0, 1)[::-1]
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Decode to HxWx3 uint8 RGB in displayed orientation (gray, alpha, 16-bit and EXIF handled)."""
    path = Path(path)
    orientation = 1
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
            if magic[:2] == b"\xff\xd8":
                orientation = _probe_jpeg(f, path).orientation
            elif magic == _PNG_SIGNATURE:
                orientation = _probe_png(f, path).orientation
    except OSError as exc:
        raise ImageReadError(path, _open_error(path, exc)) from None
    img = _decode(path)
    rgb = to_rgb_uint8(img, assume_bgr=img.ndim == 3)
    return np.ascontiguousarray(apply_orientation(rgb, orientation))
