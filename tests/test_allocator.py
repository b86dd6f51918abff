"""fedpipe.allocator in real processes: glibc gets the 1 MiB mmap threshold (freed buffers leave
the resident set), a preloaded jemalloc is recognised and told to keep its pages."""

import os
import subprocess
import sys

import pytest

from fedpipe import __version__, allocator
from fedpipe.errors import FedpipeError

# Three 4 MiB buffers, each written and freed; prints how much the resident set grew.
FREED_BUFFERS = """
import ctypes, os, sys
from fedpipe import allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if sys.argv[1] == "prepare":
    print(allocator.prepare_for_training(), allocator.prepare_for_training())
before = rss()
for _ in range(3):
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    libc.free(p)
print(rss() - before)
"""


def _run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", FREED_BUFFERS, *args], capture_output=True, text=True,
                          env=env, check=True)
    return proc.stdout.split("\n")


@pytest.mark.skipif(allocator.running() != "glibc", reason="glibc malloc only")
def test_glibc_returns_freed_buffers_only_when_prepared():
    kept = int(_run("as-is")[0])
    prepared_as, returned = _run("prepare")[:2]
    assert prepared_as == "glibc glibc"
    assert kept >= 3 << 20  # glibc's climbing threshold put the later buffers in its heap
    assert int(returned) < 1 << 20  # mmapped from 1 MiB on: freed pages left the process


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="libjemalloc2 not installed")
def test_preloaded_jemalloc_is_recognised_and_keeps_its_pages():
    env = dict(os.environ, LD_PRELOAD=allocator.jemalloc_library())
    script = ("from fedpipe import allocator; print(allocator.jemalloc_decay_ms()); "
              "print(allocator.prepare_for_training()); print(allocator.jemalloc_decay_ms())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          check=True)
    before, prepared_as, after = proc.stdout.split("\n")[:3]
    assert before != "(-1, -1)"  # jemalloc's defaults return freed pages after a while
    assert (prepared_as, after) == ("jemalloc", "(-1, -1)")



# ----------------------------------------------------------------------------- the fedpipe command

LIB = "libjemalloc.so.2"


def test_the_command_is_reexecuted_under_jemalloc_where_it_is_installed():
    env = allocator.preload_env({"PATH": "/bin"}, LIB, "glibc")
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, "MALLOC_CONF": allocator.KEEP_PAGES_CONF,
                   allocator.REEXEC_ENV: "1"}
    kept = allocator.preload_env({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"}, LIB, "glibc")
    assert (kept["LD_PRELOAD"], kept["MALLOC_CONF"]) == (f"{LIB} libfoo.so", "narenas:2")  # theirs stay
    assert allocator.preload_env({allocator.CHOICE_ENV: "jemalloc"}, LIB, "glibc") is not None


@pytest.mark.parametrize("env, library, serving", [
    ({}, None, "glibc"),                                     # jemalloc absent: today's glibc fallback
    ({allocator.CHOICE_ENV: "system"}, LIB, "glibc"),        # turned off
    ({}, LIB, "jemalloc"),                                   # already preloaded (by hand or by us)
    ({allocator.REEXEC_ENV: "1"}, LIB, "glibc"),             # the preload did not take: no second exec
])
def test_the_command_runs_as_started(env, library, serving):
    assert allocator.preload_env(env, library, serving) is None


@pytest.mark.parametrize("env, library, says", [
    ({allocator.CHOICE_ENV: "jemalloc"}, None, "apt-get install libjemalloc2"),
    ({allocator.CHOICE_ENV: "jemalloc", allocator.REEXEC_ENV: "1"}, LIB, "did not make jemalloc serve"),
    ({allocator.CHOICE_ENV: "tcmalloc"}, LIB, "valid values are auto, jemalloc, system"),
])
def test_asking_for_what_cannot_be_had_is_an_error_naming_the_variable(env, library, says):
    with pytest.raises(FedpipeError, match=says) as e:
        allocator.preload_env(env, library, "glibc")
    assert allocator.CHOICE_ENV in str(e.value)


# The console command's own entry (`app()`, as the `fedpipe` script calls it) on a cheap command;
# after it, the process that ran it says which malloc served it and jemalloc's decay.
ENTRY = """
import atexit, os
from fedpipe import allocator
atexit.register(lambda: print(allocator.running(), os.environ.get("MALLOC_CONF"),
                              allocator.jemalloc_decay_ms() if allocator.running() == "jemalloc" else ""))
from fedpipe.cli import app
app(["--version"])
"""


@pytest.mark.skipif(allocator.jemalloc_library() is None, reason="libjemalloc2 not installed")
@pytest.mark.skipif(allocator.running() == "jemalloc", reason="this test process is already under jemalloc")
def test_the_fedpipe_command_runs_under_jemalloc_with_its_decay_off():
    env = {k: v for k, v in os.environ.items() if k not in (allocator.CHOICE_ENV, allocator.REEXEC_ENV,
                                                            "LD_PRELOAD", "MALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.splitlines() == [f"fedpipe {__version__}", f"jemalloc {allocator.KEEP_PAGES_CONF} (-1, -1)"]
    off = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True, check=True,
                         env=env | {allocator.CHOICE_ENV: "system"})
    assert off.stdout.splitlines()[1] == "glibc None "
