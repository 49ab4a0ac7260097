"""Image sources: how a prompt's images are named, read and decoded (torch-free; PIL is imported only when an
image is decoded).

An image *source* is one of:

- a ``PIL.Image.Image``;
- a local path: a ``str`` or ``os.PathLike`` (absolute, or relative to the current directory; files read
  from an input file have their relative paths resolved against that file's folder already), or a
  ``file://`` URL;
- a ``data:image/...;base64,...`` URL, or a bare base64 ``str`` of an encoded image;
- an ``http(s)://`` URL, fetched only with ``allow_remote=True`` (urllib, 30 s timeout, 50 MB cap): no
  other code of the package goes to the network for an image;
- ``bytes``/``bytearray``/``memoryview`` of an encoded image (PNG, JPEG, WebP, GIF, ...);
- a ``datasets``/parquet image dict ``{"bytes": b"..." or None, "path": "..." or None}`` (the bytes win).

:func:`load_image` decodes one fully (a truncated file fails there, not later in a batch);
:func:`pixel_digest` names the decoded picture (for store keys); :func:`is_image_source` tells a source
from other values.

Example:
    >>> from PIL import Image
    >>> image = load_image(Image.new("RGB", (2, 2), "red"))
    >>> image.size, len(pixel_digest(image))
    ((2, 2), 64)
    >>> is_image_source({"bytes": None, "path": "cat.png"}), is_image_source(3)
    (True, False)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import sys
from typing import Any
from urllib.parse import unquote, unquote_to_bytes, urlparse

from .errors import ImageError

__all__ = [
    "IMAGE_PART_TYPES", "ImageError", "MAX_REMOTE_BYTES", "REMOTE_TIMEOUT_S", "describe_source", "image_kind",
    "is_image_source", "load_image", "looks_like_base64", "pixel_digest", "resolve_path",
]

# the types of chat content parts that hold an image (ours, OpenAI Chat's and the Responses API's)
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
REMOTE_TIMEOUT_S = 30.0
MAX_REMOTE_BYTES = 50 * 1024 * 1024
REMOTE_HINT = "pass allow_remote_images=True (CLI: --allow-remote-images)"

_BASE64 = re.compile(r"[A-Za-z0-9+/\-_\s]+={0,2}\s*")
_MIN_BASE64 = 64  # without an image signature, a shorter string is a path


def _is_pil(value: Any) -> bool:
    """Whether ``value`` is a PIL image (PIL not imported: it cannot be one, and is not imported to check)."""
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


# The first bytes of encoded images (a base64 string holding '/' must start with one of these to be taken for
# base64 rather than a path).
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00",
          b"\x00\x00\x00\x0cjP", b"8BPS", b"qoif", b"\xff\x4f\xff\x51")


def looks_like_base64(text: str) -> bool:
    """Whether a string is a bare base64 payload rather than a path: only the base64 alphabet (standard or
    URL-safe, whitespace allowed; so no ``.``, which file names have), and either a decoded beginning that is an
    image format's signature (PNG, JPEG, GIF, WebP, BMP, TIFF, ICO, AVIF/HEIC, JPEG 2000, PSD, QOI) or at least 64
    characters without a ``/``."""
    if len(text) < 16 or "." in text or not _BASE64.fullmatch(text):
        return False
    head = _decode_base64("".join(text[:64].split())[:32])
    if head is None:
        return False
    if head.startswith(_MAGIC) or head[4:8] == b"ftyp":
        return True
    return "/" not in text and len(text) >= _MIN_BASE64


def _decode_base64(text: str) -> bytes | None:
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def image_kind(source: Any) -> str | None:
    """What kind of source ``source`` is: ``"pil"``, ``"path"``, ``"data_url"``, ``"base64"``, ``"remote"``,
    ``"bytes"``, ``"dict"``, or None when it is none. A string is a path unless it is a URL or base64."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes" if len(source) else None
    if isinstance(source, os.PathLike):
        return "path"
    if isinstance(source, str):
        if not source.strip():
            return None
        head = source[:16].lstrip().lower()
        if head.startswith("data:"):
            return "data_url"
        if head.startswith(("http://", "https://")):
            return "remote"
        if head.startswith("file:"):
            return "path"
        if looks_like_base64(source) and not os.path.exists(source):
            return "base64"
        return "path"
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if set(source) <= {"bytes", "path"} and (
                (isinstance(data, (bytes, bytearray)) and data) or (not data and isinstance(path, str) and path)):
            return "dict"
        return None
    if _is_pil(source):
        return "pil"
    return None


def is_image_source(value: Any) -> bool:
    """Whether ``value`` is an image source (see the module docstring); any non-empty string is (a path, at
    worst a missing one); a dict only with a non-empty ``bytes`` or ``path``."""
    return image_kind(value) is not None


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """An absolute path string: ``path`` (or a ``file://`` URL) relative to ``base`` (default: the current
    directory); ``~`` is expanded."""
    text = os.fspath(path)
    if text.lower().startswith("file:"):
        text = unquote(urlparse(text).path)
    text = os.path.expanduser(text)
    if not os.path.isabs(text):
        text = os.path.join(os.fspath(base) if base is not None else os.getcwd(), text)
    return os.path.normpath(text)


def describe_source(source: Any) -> str:
    """A short name for a source in messages (a path or URL as given, else its kind and size)."""
    kind = image_kind(source)
    if kind == "path":
        return repr(os.fspath(source))
    if kind == "remote":
        return repr(source if len(source) <= 200 else source[:200] + "...")
    if kind in ("bytes", "base64", "data_url"):
        return f"{kind.replace('_', ' ')} ({len(source)} {'bytes' if kind == 'bytes' else 'characters'})"
    if kind == "dict":
        return f"image dict ({len(source['bytes'])} bytes)" if source.get("bytes") else \
            f"image dict (path {source.get('path')!r})"
    return type(source).__name__


def _fail(where: str, message: str) -> ImageError:
    return ImageError(f"{where}: {message}" if where else message)


def _decode(data: bytes, where: str, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise _fail(where, f"{what} is not an image PIL can read, or a corrupt one ({len(data)} bytes, starting "
                           f"{bytes(data[:8])!r}).") from None
    except Image.DecompressionBombError as err:
        raise _fail(where, f"{what}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated or corrupt data
        raise _fail(where, f"{what} cannot be decoded ({type(err).__name__}: {err}).") from None
    return image


def _read_file(path: str, where: str, shown: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise _fail(where, f"image file {shown} not found" + (f" (resolved to {path})" if shown != repr(path) else "")
                    + ".") from None
    except IsADirectoryError:
        raise _fail(where, f"image path {shown} is a folder, not a file.") from None
    except OSError as err:
        raise _fail(where, f"image file {shown} cannot be read ({err.strerror or err}).") from None


def _fetch(url: str, where: str) -> bytes:
    import urllib.error
    import urllib.request

    shown = url if len(url) <= 200 else url[:200] + "..."
    request = urllib.request.Request(url, headers={"User-Agent": "simple-generation"})
    try:
        with urllib.request.urlopen(request, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_REMOTE_BYTES:
                raise _fail(where, f"image URL {shown} is {int(length)} bytes, over the {MAX_REMOTE_BYTES} byte cap.")
            data = response.read(MAX_REMOTE_BYTES + 1)
    except ImageError:
        raise
    except urllib.error.HTTPError as err:
        raise _fail(where, f"fetching image URL {shown} failed: HTTP {err.code} {err.reason}.") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise _fail(where, f"fetching image URL {shown} failed: {reason}.") from None
    if len(data) > MAX_REMOTE_BYTES:
        raise _fail(where, f"image URL {shown} is over the {MAX_REMOTE_BYTES} byte cap.")
    return data


def _data_url(url: str, where: str) -> bytes:
    head, comma, payload = url.strip().partition(",")
    if not comma:
        raise _fail(where, "data: URL without a comma (expected data:image/...;base64,...).")
    if head.lower().endswith(";base64"):
        data = _decode_base64(payload)
        if data is None:
            raise _fail(where, "data: URL whose base64 payload cannot be decoded.")
        return data
    return unquote_to_bytes(payload)


def load_image(source: Any, *, allow_remote: bool = False, where: str = "") -> Any:
    """The ``PIL.Image.Image`` of ``source`` (see the module docstring), decoded fully (``.load()``) and
    unconverted (its own mode). A relative path is relative to the current directory.

    Raises :class:`~simple_generation.errors.ImageError` (an ``InputError``, so a ``ValueError``) with a
    one-line message starting with ``where``: a missing file (named), data that is not an image or cannot be
    decoded (truncated, corrupt), a remote URL while remote images are off, a failed fetch.

    Example:
        >>> load_image("missing.png", where="texts[3], image 1")
        Traceback (most recent call last):
        ...
        simple_generation.errors.ImageError: texts[3], image 1: image file 'missing.png' not found (resolved to ...).
    """
    kind = image_kind(source)
    if kind is None:
        if isinstance(source, dict):
            raise _fail(where, f"an image dict needs non-empty \"bytes\" or \"path\" (and nothing else), got keys "
                               f"{sorted(map(str, source))}.")
        if isinstance(source, (str, bytes, bytearray, memoryview)):
            raise _fail(where, "empty image source.")
        raise _fail(where, f"not an image source: {type(source).__name__} {source!r:.60} (expected a PIL image, a "
                           "path, a data:/http(s) URL, base64, bytes or a {\"bytes\", \"path\"} dict).")
    if kind == "pil":
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _fail(where, f"the PIL image cannot be decoded ({type(err).__name__}: {err}).") from None
        return source
    if kind == "bytes":
        return _decode(bytes(source), where, "the image bytes")
    if kind == "data_url":
        return _decode(_data_url(source, where), where, "the data: URL")
    if kind == "base64":
        return _decode(_decode_base64(source) or b"", where, "the base64 image")
    if kind == "remote":
        if not allow_remote:
            raise _fail(where, f"image URL {describe_source(source)} is remote and remote images are off; "
                               f"{REMOTE_HINT}, or download it and give its path.")
        return _decode(_fetch(source.strip(), where), where, f"the image at {describe_source(source)}")
    if kind == "dict":
        if source.get("bytes"):
            return _decode(bytes(source["bytes"]), where, f"the image bytes of {source.get('path') or 'a dict'}")
        return load_image(source["path"], allow_remote=allow_remote, where=where)
    shown = repr(os.fspath(source))
    path = resolve_path(source)
    return _decode(_read_file(path, where, shown), where, f"image file {shown}")


def pixel_digest(image: Any) -> str:
    """sha256 hex digest of a decoded image's pixels: its mode, size, palette (palette modes) and raw bytes.
    The same picture saved as PNG and JPEG gets the same digest only when the decoded pixels are equal (JPEG
    is lossy: usually not)."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}\0{image.size[0]}x{image.size[1]}\0".encode())
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        digest.update(bytes(palette))
        transparency = image.info.get("transparency")
        if transparency is not None:
            digest.update(repr(transparency).encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
