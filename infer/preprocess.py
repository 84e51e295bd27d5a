"""Image -> network input, and the coordinate maps between the two (numpy + OpenCV, no torch).

This is the one resize used everywhere: the dataset's validation transform, every deployment backend
and the benchmark, so training-time numbers and deployed numbers see identical pixels.

Resize modes:
- ``stretch``: resize to (H, W) ignoring the aspect ratio (D-FINE-seg's default).
- ``letterbox``: scale by one factor so the image fits, centre it, pad the rest with gray 114
  (Ultralytics' value). Gray rather than black because black is a legitimate, frequent image content
  while 114 sits near the mean of natural images, so the padding looks least like an object edge.

Coordinates: a ``ResizeMeta`` records per-axis scale and the top-left padding, so that
``network = original * scale + pad`` and ``original = (network - pad) / scale`` for continuous pixel
coordinates (pixel i covers [i, i+1)). The scales are the *realised* ones (new size / old size after
rounding to whole pixels), which is what makes the box round trip exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

RESIZE_MODES = ("stretch", "letterbox")
LETTERBOX_PAD_VALUE = 114


@dataclass(frozen=True)
class ResizeMeta:
    """How one original image was mapped to the network input."""

    orig_h: int
    orig_w: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    in_h: int
    in_w: int

    @property
    def orig_shape(self) -> tuple[int, int]:
        return (self.orig_h, self.orig_w)

    @property
    def content_hw(self) -> tuple[int, int]:
        """Size of the resized image content inside the network input (without padding)."""
        return (round(self.orig_h * self.scale_y), round(self.orig_w * self.scale_x))


def _check_imgsz(imgsz: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(imgsz, int | np.integer):
        h = w = int(imgsz)
    else:
        if len(imgsz) != 2:
            raise ValueError(f"imgsz must be an int or (H, W), got {imgsz!r}")
        h, w = int(imgsz[0]), int(imgsz[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"imgsz must be positive, got {imgsz!r}")
    return h, w


def to_rgb_uint8(img: np.ndarray, assume_bgr: bool = False) -> np.ndarray:
    """Convert any common image array to HxWx3 uint8 RGB.

    Accepts gray (HxW or HxWx1), 3 channels, 4 channels (alpha dropped: the network was trained
    without it), uint8, uint16 (scaled by 255/65535, keeping the full dynamic range) and float
    (must already be in 0..1; anything else is ambiguous and refused). ``assume_bgr`` says the
    colour channels arrive in OpenCV's BGR(A) order.
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(img).__name__}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image is empty (shape {img.shape})")

    if img.dtype == np.uint8:
        pass
    elif img.dtype == np.uint16:
        img = ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(img.dtype, np.floating):
        finite = img[np.isfinite(img)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            raise ValueError(
                f"float image values must lie in 0..1, got {finite.min():.4g}..{finite.max():.4g}; "
                "divide by 255 (or 65535) first, or pass a uint8/uint16 array"
            )
        img = np.clip(np.nan_to_num(img, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    else:
        raise ValueError(f"unsupported image dtype {img.dtype}; use uint8, uint16 or float in 0..1")

    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    img = img[:, :, :3]
    if assume_bgr:
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def letterbox(
    img: np.ndarray, imgsz: int | Sequence[int], pad_value: int = LETTERBOX_PAD_VALUE
) -> tuple[np.ndarray, ResizeMeta]:
    """Fit ``img`` (HxWxC) inside (H, W) keeping its aspect ratio, centred, padded with ``pad_value``."""
    in_h, in_w = _check_imgsz(imgsz)
    h0, w0 = img.shape[:2]
    r = min(in_h / h0, in_w / w0)
    new_w = min(in_w, max(1, round(w0 * r)))
    new_h = min(in_h, max(1, round(h0 * r)))
    pad_x = (in_w - new_w) // 2
    pad_y = (in_h - new_h) // 2
    resized = img if (new_h, new_w) == (h0, w0) else cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((in_h, in_w) + img.shape[2:], pad_value, dtype=img.dtype)
    out[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized.reshape((new_h, new_w) + img.shape[2:])
    meta = ResizeMeta(h0, w0, new_w / w0, new_h / h0, pad_x, pad_y, in_h, in_w)
    return out, meta


def stretch(img: np.ndarray, imgsz: int | Sequence[int]) -> tuple[np.ndarray, ResizeMeta]:
    """Resize ``img`` to exactly (H, W), ignoring the aspect ratio."""
    in_h, in_w = _check_imgsz(imgsz)
    h0, w0 = img.shape[:2]
    out = img if (h0, w0) == (in_h, in_w) else cv2.resize(img, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    out = out.reshape((in_h, in_w) + img.shape[2:])
    return out, ResizeMeta(h0, w0, in_w / w0, in_h / h0, 0, 0, in_h, in_w)


def resize_image(img: np.ndarray, imgsz: int | Sequence[int], resize: str = "stretch") -> tuple[np.ndarray, ResizeMeta]:
    """Resize with the named mode (``stretch`` or ``letterbox``)."""
    if resize == "stretch":
        return stretch(img, imgsz)
    if resize == "letterbox":
        return letterbox(img, imgsz)
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


def preprocess(
    images: Sequence[np.ndarray] | np.ndarray,
    imgsz: int | Sequence[int],
    resize: str = "stretch",
    assume_bgr: bool = False,
) -> tuple[np.ndarray, list[ResizeMeta]]:
    """Images (RGB uint8 HxWx3, or anything ``to_rgb_uint8`` accepts) -> float32 [B,3,H,W] RGB 0..1."""
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    in_h, in_w = _check_imgsz(imgsz)
    batch = np.empty((len(images), 3, in_h, in_w), dtype=np.float32)
    metas: list[ResizeMeta] = []
    for i, img in enumerate(images):
        resized, meta = resize_image(to_rgb_uint8(img, assume_bgr=assume_bgr), (in_h, in_w), resize)
        # HWC uint8 -> CHW float in one pass; multiplying by the reciprocal is what the graph expects (/255).
        np.multiply(resized.transpose(2, 0, 1), np.float32(1.0 / 255.0), out=batch[i], casting="unsafe")
        metas.append(meta)
    return batch, metas


def boxes_to_original(boxes_norm_xyxy: np.ndarray, meta: ResizeMeta, clip: bool = True) -> np.ndarray:
    """(N,4) xyxy normalised to the network input -> xyxy pixels of the original image (float64)."""
    b = np.asarray(boxes_norm_xyxy, dtype=np.float64).reshape(-1, 4)
    size = np.array([meta.in_w, meta.in_h, meta.in_w, meta.in_h], dtype=np.float64)
    pad = np.array([meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y], dtype=np.float64)
    scale = np.array([meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y], dtype=np.float64)
    out = (b * size - pad) / scale
    if clip:
        out[:, 0::2] = out[:, 0::2].clip(0, meta.orig_w)
        out[:, 1::2] = out[:, 1::2].clip(0, meta.orig_h)
    return out


def boxes_to_network(boxes_xyxy: np.ndarray, meta: ResizeMeta) -> np.ndarray:
    """Inverse of ``boxes_to_original`` (without clipping): original pixels -> normalised network xyxy."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    size = np.array([meta.in_w, meta.in_h, meta.in_w, meta.in_h], dtype=np.float64)
    pad = np.array([meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y], dtype=np.float64)
    scale = np.array([meta.scale_x, meta.scale_y, meta.scale_x, meta.scale_y], dtype=np.float64)
    return (b * scale + pad) / size
