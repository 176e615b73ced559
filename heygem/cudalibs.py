"""Which shared libraries the CUDA provider needs, and which of them this process can load.

ONNX Runtime only says "cannot open libX" for the first library that fails; an operator fixing
one library at a time would go round in circles. Reading the provider's own DT_NEEDED list and
trying each library lists every missing one at once, without `ldd` (which may run code of the
inspected file) and without importing onnxruntime.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Optional

PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"
# cuDNN is dlopen'ed by the provider when it first needs it, so it is absent from DT_NEEDED;
# every onnxruntime-gpu wheel since 1.19 (CUDA 12 and 13 builds) needs cuDNN 9.
RUNTIME_LOADED = ("libcudnn.so.9",)

_SHT_DYNAMIC, _DT_NULL, _DT_NEEDED = 6, 0, 1


def elf_needed(path: str | Path) -> list[str]:
    """The DT_NEEDED entries of an ELF shared object, read from its section headers.

    Reads only the headers, the dynamic section and its string table: a few KiB of a provider
    library that weighs hundreds of MiB.
    """
    with open(path, "rb") as f:
        ident = f.read(16)
        if ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise ValueError(f"{path}: not an ELF file")
        wide = ident[4] == 2
        end = "<" if ident[5] == 1 else ">"
        header = struct.Struct(end + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"))
        fields = header.unpack(f.read(header.size))
        shoff, shentsize, shnum = fields[5], fields[10], fields[11]
        if not shoff or not shnum:
            raise ValueError(f"{path}: no section headers")
        section = struct.Struct(end + ("IIQQQQIIQQ" if wide else "IIIIIIIIII"))

        def read_section(index: int) -> tuple[int, int, int, int]:
            f.seek(shoff + index * shentsize)
            _, kind, _, _, offset, size, link, *_ = section.unpack(f.read(section.size))
            return kind, offset, size, link

        for index in range(shnum):
            kind, offset, size, link = read_section(index)
            if kind == _SHT_DYNAMIC:
                break
        else:
            return []  # a static object needs nothing
        f.seek(offset)
        dynamic = f.read(size)
        _, str_offset, str_size, _ = read_section(link)
        f.seek(str_offset)
        strings = f.read(str_size)

    entry = struct.Struct(end + ("qQ" if wide else "iI"))
    needed = []
    for tag, value in entry.iter_unpack(dynamic[: len(dynamic) - len(dynamic) % entry.size]):
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(strings[value : strings.index(b"\0", value)].decode())
    return needed


def provider_library() -> Optional[Path]:
    """The installed CUDA provider library, found without importing onnxruntime."""
    spec = importlib.util.find_spec("onnxruntime")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "capi" / PROVIDER_LIBRARY
        if path.is_file():
            return path
    return None


def ldconfig_paths() -> dict[str, str]:
    """soname -> path from the dynamic loader's cache (`ldconfig -p`), this ABI's entries only."""
    exe = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None)
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    wide = sys.maxsize > 2**32
    paths: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        name, _, rest = line.strip().partition(" (")
        flags, _, path = rest.partition(") => ")
        if path and ("64" in flags) == wide:
            paths.setdefault(name, path)
    return paths


def wheel_copies() -> dict[str, str]:
    """soname -> path inside NVIDIA's pip wheels (site-packages/nvidia/*/lib), if any are installed.

    Those copies are not on the loader's path: ONNX Runtime finds them only after
    `onnxruntime.preload_dlls()` or with their folder on LD_LIBRARY_PATH.
    """
    spec = importlib.util.find_spec("nvidia")
    copies: dict[str, str] = {}
    for root in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(root).glob("*/lib/lib*.so*")):
            copies.setdefault(lib.name, str(lib))
    return copies


def _loader_path(name: str, cache: dict[str, str]) -> Optional[str]:
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return cache.get(name)


def cuda_libraries(provider: Optional[Path] = None) -> list[dict]:
    """Every library the CUDA provider needs: name, found, path, error, wheel_path.

    `found` means this process can dlopen it by name, the way the provider will. Loading does
    not change what a later session sees: the same search finds the same file.
    """
    provider = provider or provider_library()
    if provider is None:
        return []
    cache, wheels = ldconfig_paths(), wheel_copies()
    report = []
    for name in [*elf_needed(provider), *RUNTIME_LOADED]:
        try:
            ctypes.CDLL(name)
            found, error = True, None
        except OSError as err:
            found, error = False, str(err)
        report.append(
            {"name": name, "found": found, "path": _loader_path(name, cache), "error": error, "wheel_path": wheels.get(name)}
        )
    return report
