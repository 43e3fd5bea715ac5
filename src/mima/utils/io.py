"""Crash-safe file writes, safetensors helpers and content hashes.

Every writer here goes through a temporary file in the destination directory followed by `os.replace`, so a reader
never sees a half-written artifact: a crash leaves either the previous file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes

_CHUNK = 1 << 20
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike[str], mode: str) -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the permissions open() would
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, creating parent directories.

    Args:
        path (`str` or `os.PathLike`):
            Destination file; replaced if it exists.
        text (`str`):
            Content to write.
    """
    with _atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically, creating parent directories.

    Args:
        path (`str` or `os.PathLike`):
            Destination file; replaced if it exists.
        data (`bytes`):
            Content to write.
    """
    with _atomic_open(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(final_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and move it into place only if the block succeeds.

    An existing `final_dir` is first renamed to a trash sibling, the new directory is renamed in, and only then is the
    trash deleted, so a crash at any moment leaves a complete old or new directory (the old one possibly under its
    `.<name>.trash-<pid>` name). On an exception the temporary directory is deleted and `final_dir` is untouched.

    Args:
        final_dir (`str` or `os.PathLike`):
            Where the finished directory should end up.

    Yields:
        `Path`: The temporary directory `.<name>.tmp-<pid>` to write into.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    trash_dir = final_dir.with_name(f".{final_dir.name}.trash-{os.getpid()}")
    # Leftovers from a crashed process that had the same pid.
    for stale in (tmp_dir, trash_dir):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        yield tmp_dir
    except BaseException as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        os_error = _as_os_error(e, final_dir)
        if os_error is not None:
            raise os_error from e
        raise
    if final_dir.exists():
        os.replace(final_dir, trash_dir)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def _as_os_error(error: BaseException, path: Path) -> OSError | None:
    """The OS error behind a writer's own exception: safetensors reports a full disk as text ending in
    `(os error 28)`. None for anything else, including a plain `OSError`, which needs no translation."""
    match = _OS_ERROR_CODE.search(str(error))
    if match is None or isinstance(error, OSError):
        return None
    code = int(match[1])
    return OSError(code, os.strerror(code), str(path))


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors to a `.safetensors` file atomically.

    Args:
        path (`str` or `os.PathLike`):
            Destination file.
        tensors (`dict[str, torch.Tensor]`):
            Tensors to save; non-contiguous ones are made contiguous.
        metadata (`dict[str, str]`, *optional*):
            String metadata stored in the file header, readable with [`load_tensor_metadata`].
    """
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    atomic_write_bytes(path, _safetensors_bytes(tensors, metadata=metadata))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load every tensor of a `.safetensors` file onto the CPU.

    Args:
        path (`str` or `os.PathLike`):
            File written by [`save_tensors`] or any safetensors writer.
    """
    return load_file(os.fspath(path), device="cpu")


def load_tensor_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read the header metadata of a `.safetensors` file without loading tensors.

    Args:
        path (`str` or `os.PathLike`):
            File written by [`save_tensors`].
    """
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def hash_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 hex digest of tensors' names, dtypes, shapes and raw bytes, independent of dict order and device.

    Args:
        tensors (`dict[str, torch.Tensor]`):
            Tensors to hash.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        # Length-prefixed header so ("ab", "c") and ("a", "bc") can never collide.
        header = f"{len(name)}:{name}|{tensor.dtype}|{tuple(tensor.shape)}|{len(raw)}|"
        digest.update(header.encode())
        digest.update(raw)
    return digest.hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's content.

    Args:
        path (`str` or `os.PathLike`):
            File to hash.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def save_torch_state(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` atomically; meant for optimizer and RNG state, never for model weights (use [`save_tensors`]).

    Args:
        obj (`Any`):
            Object made only of tensors and plain Python containers/scalars, so [`load_torch_state`] can read it.
        path (`str` or `os.PathLike`):
            Destination file.
    """
    buffer = io.BytesIO()  # torch.save reports a failed write (a full disk) as a RuntimeError; a plain write does not
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_torch_state(path: str | os.PathLike[str]) -> Any:
    """Load a file written by [`save_torch_state`] onto the CPU with `weights_only=True` (no arbitrary unpickling).

    Args:
        path (`str` or `os.PathLike`):
            File to load.
    """
    return torch.load(path, map_location="cpu", weights_only=True)
