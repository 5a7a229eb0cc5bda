"""Readers' error boundary: a corrupt, truncated or mis-typed input file becomes one clear error naming the file.

Deliberately light (standard library only) so fast command lines, like ``diff-sim-refiner nanobragg``, can use it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import struct
import zipfile
from typing import Iterator

# what a corrupt or truncated file can make a parser raise (h5py: OSError/RuntimeError/KeyError; text: UnicodeError;
# npz: BadZipFile; binary headers: struct.error, EOFError; absurd declared sizes: MemoryError)
_LOW_LEVEL_READ_ERRORS = (OSError, RuntimeError, KeyError, IndexError, TypeError, ValueError, EOFError,
                          MemoryError, zipfile.BadZipFile, struct.error)


@contextlib.contextmanager
def reading(path: str | os.PathLike, error: type[Exception] = ValueError, what: str = "file") -> Iterator[None]:
    """Any low-level failure while reading ``path`` becomes ``error`` naming the file and what it should be;
    ``error`` itself passes through. Readers wrap their parsing in this, so a corrupt input is one clear
    message, never a stray KeyError from deep inside a parser."""
    try:
        yield
    except error:
        raise
    except _LOW_LEVEL_READ_ERRORS as exc:
        raise error(f"{path}: unreadable or corrupt {what} ({type(exc).__name__}: {exc})") from exc


def reader(what: str, error: type[Exception] = ValueError):
    """Decorator form of :func:`reading` for functions whose first argument is the path."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(path, *args, **kwargs):
            with reading(path, error, what):
                return fn(path, *args, **kwargs)
        return wrapper
    return deco
