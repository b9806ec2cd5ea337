"""The native kernel's first use, as it happens on shared machines and in killed jobs.

A killed build must not hang later processes, two environments must not rebuild each
other's copy, a complete build is only read, arguments are checked before any build, and
a build that cannot happen falls back (``auto``) or raises (``cpu``) with one warning.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from gft_kernels import backends, gft_loss
from gft_kernels.backends import cpu_rows

_REAL: list = []


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget the cached build (module, failure, warning, backend cache) for one test;
    monkeypatch restores everything afterwards."""
    _REAL[:] = [cpu_rows.require()]  # the real build exists (cached on disk) before we start
    for name in ("_module", "_error", "_warned"):
        monkeypatch.setattr(cpu_rows, name, getattr(cpu_rows, name))
    monkeypatch.setattr(backends, "_CACHE", dict(backends._CACHE))
    cpu_rows._reset_for_tests()
    backends._reset_for_tests()
    return monkeypatch


def fake_compile(real_module):
    """A stand-in for the 30 s compile: records the call and returns the real module."""
    calls = []

    def compile_(folder, name, verbose):
        calls.append(name)
        (folder / f"{name}.so").write_bytes(b"stand-in")
        return real_module

    return compile_, calls


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, pid: int, host: str = None, age: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / cpu_rows._LOCK_NAME
    owner = {"pid": pid, "host": host or socket.gethostname(), "time": time.time() - age}
    lock.write_text(json.dumps(owner))
    if age:
        os.utime(lock, (time.time() - age, time.time() - age))
    (folder / "lock").write_text("")  # what torch's builder leaves when it is killed
    return lock


def test_stale_lock_of_a_killed_build_is_broken(fresh_loader, tmp_path):
    fresh_loader.setenv(cpu_rows.BUILD_DIR_ENV, str(tmp_path))
    folder = cpu_rows.build_directory()
    write_lock(folder, dead_pid())
    compile_, calls = fake_compile(_real_module())
    fresh_loader.setattr(cpu_rows, "_compile", compile_)
    start = time.monotonic()
    module = cpu_rows.require()
    assert time.monotonic() - start < 10
    assert module.simd_path() in ("avx2", "scalar")
    assert calls == [folder.name]
    assert not (folder / cpu_rows._LOCK_NAME).exists() and not (folder / "lock").exists()
    assert (folder / cpu_rows._DONE_NAME).is_file()


def test_old_lock_from_another_host_is_broken(fresh_loader, tmp_path):
    fresh_loader.setenv(cpu_rows.BUILD_DIR_ENV, str(tmp_path))
    fresh_loader.setenv(cpu_rows.STALE_ENV, "60")
    folder = cpu_rows.build_directory()
    write_lock(folder, os.getpid(), host="another-host", age=600)
    compile_, calls = fake_compile(_real_module())
    fresh_loader.setattr(cpu_rows, "_compile", compile_)
    assert cpu_rows.require() is not None and len(calls) == 1


def test_live_lock_times_out_then_falls_back(fresh_loader, tmp_path):
    fresh_loader.setenv(cpu_rows.BUILD_DIR_ENV, str(tmp_path))
    fresh_loader.setenv(cpu_rows.WAIT_ENV, "1")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(cpu_rows.build_directory(), holder.pid)
        compile_, calls = fake_compile(_real_module())
        fresh_loader.setattr(cpu_rows, "_compile", compile_)
        logits = torch.randn(3, 7)
        args = (torch.tensor([1, 2, 3]), torch.ones(3))
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            loss = gft_loss(logits, *args, backend="auto")
            gft_loss(logits, *args, backend="auto")
        assert time.monotonic() - start < 20
        found = [w for w in records if "native CPU kernel" in str(w.message)]
        assert len(found) == 1 and "timed out" in str(found[0].message)
        torch.testing.assert_close(loss, gft_loss(logits, *args, backend="torch"))
        with pytest.raises(RuntimeError, match="backend 'cpu'.*timed out"):
            gft_loss(logits, *args, backend="cpu")
        assert calls == []
    finally:
        holder.kill()
        holder.wait()


def test_complete_build_is_only_read(fresh_loader):
    def refuse(*args, **kwargs):
        raise AssertionError("a complete build must be loaded without locking or writing")

    fresh_loader.setattr(cpu_rows, "_try_lock", refuse)
    fresh_loader.setattr(cpu_rows, "_compile", refuse)
    fresh_loader.setattr(Path, "mkdir", refuse)
    folder = cpu_rows.build_directory()
    before = sorted((p.name, p.stat().st_mtime) for p in folder.iterdir())
    assert cpu_rows.require().simd_path() in ("avx2", "scalar")
    assert sorted((p.name, p.stat().st_mtime) for p in folder.iterdir()) == before


def test_build_folder_is_keyed_by_what_changes_the_build(monkeypatch):
    key = cpu_rows.build_key()
    assert cpu_rows.build_directory().name.endswith(key)
    monkeypatch.setattr(cpu_rows, "EXTRA_CFLAGS", cpu_rows.EXTRA_CFLAGS + ("-DGFT_OTHER",))
    assert cpu_rows.build_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cpu_rows.build_key() != key


def test_arguments_are_checked_before_any_build(tmp_path):
    """A bad argument in a fresh process raises at once; nothing is built or written."""
    script = textwrap.dedent(
        """
        import time, torch
        from gft_kernels import gft_loss
        start = time.monotonic()
        for kwargs in (dict(tau=-1.0), dict(backend="cpu", temperature=0.0)):
            try:
                gft_loss(torch.randn(2, 5), torch.tensor([0, 1]), torch.ones(2), **kwargs)
            except ValueError:
                pass
            else:
                raise SystemExit("no ValueError")
        print(time.monotonic() - start)
        """
    )
    env = dict(os.environ, **{cpu_rows.BUILD_DIR_ENV: str(tmp_path)})
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) < 5
    assert list(tmp_path.iterdir()) == []


# --- fallback when the build fails ---------------------------------------------------


def _fallback_warnings(records) -> list:
    return [
        w
        for w in records
        if issubclass(w.category, RuntimeWarning) and "native CPU kernel" in str(w.message)
    ]


def test_fallback_warns_once_when_build_fails(fresh_loader, tmp_path):
    calls = []

    def failing_compile(folder, name, verbose):
        calls.append(name)
        raise RuntimeError("Error building extension 'gft_kernels_cpu': c++: not found")

    fresh_loader.setenv(cpu_rows.BUILD_DIR_ENV, str(tmp_path))
    fresh_loader.setattr(cpu_rows, "_compile", failing_compile)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert cpu_rows.is_available() is False
        assert cpu_rows.is_available() is False
    found = _fallback_warnings(records)
    assert len(found) == 1, [str(w.message) for w in records]
    message = str(found[0].message)
    assert "could not be built" in message and "torch backend" in message
    assert "c++: not found" in message
    assert len(calls) == 1, "a failed build must be cached, not retried on every call"
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu_rows.require()
    assert not (cpu_rows.build_directory() / cpu_rows._LOCK_NAME).exists()


def test_fallback_env_var_disables_build(fresh_loader):
    fresh_loader.setenv(cpu_rows.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=f"disabled by {cpu_rows.DISABLE_ENV}"):
        assert cpu_rows.is_available() is False
    with pytest.raises(RuntimeError, match=cpu_rows.DISABLE_ENV):
        cpu_rows.require()
    with pytest.raises(RuntimeError, match="backend 'cpu'"):
        gft_loss(torch.zeros(1, 3), torch.tensor([0]), torch.ones(1), backend="cpu")


def test_reset_rebuilds_after_failure(fresh_loader):
    fresh_loader.setenv(cpu_rows.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning):
        assert not cpu_rows.is_available()
    fresh_loader.delenv(cpu_rows.DISABLE_ENV)
    cpu_rows._reset_for_tests()
    assert cpu_rows.is_available()  # the on-disk build makes this a load, not a compile
    assert cpu_rows.require().simd_path() in ("avx2", "scalar")


def _real_module():
    """The real extension module, loaded by ``fresh_loader`` before it reset the state."""
    return _REAL[0]
