"""Which memory allocator a CPU training process runs with, and fedpipe's setting for it.

Peak memory on a CPU is predictable (the cost model within ±10%) only when freed activation
buffers do not pile up in the allocator's heap. Measured on SmolLM2-135M, LoRA r=8, one thread
(``benchmarks/bench_allocator.py``; README 'Calibration'):

- glibc malloc as it comes keeps them: its peak is 1.4-2x jemalloc's, still climbing after three
  steps and up to 27% apart between processes of the same configuration;
- glibc with ``M_MMAP_THRESHOLD`` = 1 MiB hands them back on free: predictable, but every step
  page-faults its activations afresh (3-4x the page faults, 1.15-1.3x the CPU time per step);
- jemalloc reuses them without piling them up: the lowest peak, the same from process to process.
  Told never to return freed pages to the system (dirty and muzzy decay off), it also takes a
  third of glibc's page faults per step, and its peak no longer depends on how fast the steps run.

jemalloc cannot be switched on inside a running process: it must be preloaded when the process
starts (``LD_PRELOAD=libjemalloc.so.2``; Debian/Ubuntu package ``libjemalloc2``). So the
``fedpipe`` command re-executes itself once under jemalloc where the library is installed
(`start_command`; ``FEDPIPE_ALLOCATOR=system`` keeps the system allocator, ``=jemalloc`` insists on
jemalloc), with the decay off from the start (``MALLOC_CONF``). A process started under jemalloc
anyway (preloaded by hand) gets the decay turned off at load, and one without it gets glibc's
1 MiB mmap threshold. Child processes inherit the environment, so ``fedpipe calibrate``'s
measuring processes, ``fedpipe node``'s Flower processes and the trainer run with the same
allocator, and predictions hold for the runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

from fedpipe.errors import FedpipeError

Allocator = Literal["jemalloc", "glibc", "other"]
M_MMAP_THRESHOLD = -3  # glibc malloc.h
GLIBC_MMAP_THRESHOLD_BYTES = 1 << 20
CHOICE_ENV = "FEDPIPE_ALLOCATOR"  # auto (default) | jemalloc | system
CHOICES = ("auto", "jemalloc", "system")
REEXEC_ENV = "FEDPIPE_ALLOCATOR_REEXEC"  # set on the re-executed command: never a second time
KEEP_PAGES_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # jemalloc's MALLOC_CONF: decay off
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", "/usr/local/lib64")

log = logging.getLogger(__name__)
_prepared = False


def running() -> Allocator:
    """The allocator serving malloc in this process: jemalloc where it has replaced malloc
    process-wide (preloaded), else glibc where glibc is the C library, else other."""
    process = ctypes.CDLL(None)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        libc = None
    if hasattr(process, "mallctl") and (libc is None or _address(process.malloc) != _address(libc.malloc)):
        return "jemalloc"
    return "glibc" if libc is not None else "other"


def _address(function: Callable[..., object]) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value


def jemalloc_library() -> str | None:
    """The name to put in ``LD_PRELOAD`` for jemalloc on this machine; None where not installed.
    The loader's cache first, then the usual library folders (a build under /usr/local that
    ldconfig was not run for)."""
    found = ctypes.util.find_library("jemalloc")
    if found:
        return found
    for folder in LIBRARY_DIRS:
        candidates = sorted(Path(folder).glob("libjemalloc.so*")) if Path(folder).is_dir() else []
        if candidates:
            return str(candidates[0])
    return None


def preload_env(env: Mapping[str, str], library: str | None, serving: Allocator) -> dict[str, str] | None:
    """The environment to re-execute the command with so that jemalloc serves its malloc, or None
    to run as started: jemalloc already serves it, ``FEDPIPE_ALLOCATOR=system``, no jemalloc on
    this machine, or this is the re-executed command already (whatever the preload did: one
    re-exec at most). ``FEDPIPE_ALLOCATOR=jemalloc`` turns the last two into errors."""
    choice = env.get(CHOICE_ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise FedpipeError(f"{CHOICE_ENV}={choice!r}: valid values are {', '.join(CHOICES)} (auto: "
                           "jemalloc where installed, else the system allocator)")
    if choice == "system" or serving == "jemalloc":
        return None
    if env.get(REEXEC_ENV):
        if choice == "jemalloc":
            raise FedpipeError(f"{CHOICE_ENV}=jemalloc: preloading {env.get('LD_PRELOAD', library)} "
                               "did not make jemalloc serve malloc; set "
                               f"{CHOICE_ENV}=system to go on without it")
        return None
    if library is None:
        if choice == "jemalloc":
            raise FedpipeError(f"{CHOICE_ENV}=jemalloc: no libjemalloc on this machine (looked in the "
                               f"loader's cache and {', '.join(LIBRARY_DIRS)}); install it (Debian/"
                               f"Ubuntu: apt-get install libjemalloc2) or set {CHOICE_ENV}=auto or system")
        return None
    preload = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return {**env, "LD_PRELOAD": preload, "MALLOC_CONF": env.get("MALLOC_CONF") or KEEP_PAGES_CONF,
            REEXEC_ENV: "1"}


def start_command() -> None:
    """At the start of the ``fedpipe`` command (its console entry point, not on import): re-execute
    the same command line once with jemalloc preloaded where `preload_env` says so (module
    docstring). Returns only when the command runs as started."""
    if not sys.platform.startswith("linux"):  # LD_PRELOAD is the Linux loader's
        return
    env = preload_env(os.environ, jemalloc_library(), running())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _mallctl() -> Callable[..., int]:
    mallctl = ctypes.CDLL(None).mallctl
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t]
    mallctl.restype = ctypes.c_int
    return mallctl


def jemalloc_decay_ms() -> tuple[int, int]:
    """(dirty, muzzy) decay of jemalloc's first arena in ms; -1 is 'never return pages'."""
    mallctl, value = _mallctl(), ctypes.c_ssize_t()
    size = ctypes.c_size_t(ctypes.sizeof(value))
    out = []
    for kind in ("dirty", "muzzy"):
        mallctl(f"arena.0.{kind}_decay_ms".encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
        out.append(value.value)
    return out[0], out[1]


def _keep_jemalloc_pages() -> None:
    """Dirty and muzzy decay off, for the arenas in use and those made later."""
    mallctl, never = _mallctl(), ctypes.c_ssize_t(-1)
    count, size = ctypes.c_uint(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, 0)
    for kind in ("dirty", "muzzy"):
        mallctl(f"arenas.{kind}_decay_ms".encode(), None, None, ctypes.byref(never), ctypes.sizeof(never))
        for i in range(count.value):  # arenas not created yet answer EFAULT: they take the above
            mallctl(f"arena.{i}.{kind}_decay_ms".encode(), None, None, ctypes.byref(never),
                    ctypes.sizeof(never))


def release_free_pages() -> None:
    """Hand the allocator's free memory back to the OS, so that a baseline read next holds live
    memory only: jemalloc purges every arena's dirty pages (it keeps them forever otherwise, decay
    being off), glibc trims its heap (`malloc_trim`); other allocators are left alone."""
    kind = running()
    if kind == "jemalloc":
        _mallctl()(b"arena.4096.purge", None, None, None, 0)  # 4096: MALLCTL_ARENAS_ALL
    elif kind == "glibc":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def prepare_for_training() -> Allocator:
    """Once per process, before CPU training: keep freed buffers from piling up in the resident
    set without paying for it in page faults, as far as the running allocator allows (module
    docstring). Elsewhere than jemalloc and glibc (macOS, musl) nothing is changed."""
    global _prepared
    allocator = running()
    if _prepared:
        return allocator
    _prepared = True
    if allocator == "jemalloc":
        _keep_jemalloc_pages()
    elif allocator == "glibc":
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_BYTES)
        if os.environ.get(CHOICE_ENV) != "system":  # asked for: nothing to say
            log.warning("fedpipe: CPU training on glibc malloc with a 1 MiB mmap threshold, steps about "
                        "1.3x as long as under jemalloc (install libjemalloc2: the fedpipe command "
                        "then uses it)")
    return allocator
