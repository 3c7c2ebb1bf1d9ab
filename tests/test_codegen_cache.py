"""The on-disk module cache: location, hash-named atomic files, reuse across processes, corrupt files."""
import os
import subprocess
import sys
import textwrap

import pytest

from mixforge.codegen import cache

SOURCE = "X = 1\n"
# subprocesses load cache.py on its own (stdlib, filelock, platformdirs): no torch import to wait for
LOAD_CACHE = textwrap.dedent(f"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cache", {cache.__file__!r})
    cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache)
""")


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXFORGE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_files_are_named_by_hash_under_the_root(root):
    mod, path, hit = cache.load_module("my-mixer", SOURCE)
    assert path.parent == root / "kernels" and path.name == f"my_mixer_{cache.source_hash(SOURCE)}.py"
    assert path.read_text() == SOURCE and mod.X == 1 and not hit
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    _, again, hit = cache.load_module("my-mixer", SOURCE)
    assert again == path and hit


def test_default_root_is_the_user_cache_dir(monkeypatch):
    import platformdirs

    monkeypatch.delenv("MIXFORGE_CACHE_DIR", raising=False)
    assert cache.kernels_dir() == cache.Path(platformdirs.user_cache_dir("mixforge")) / "kernels"


def test_a_second_process_reuses_the_file(root):
    _, path, _ = cache.load_module("shared", SOURCE)
    mtime = path.stat().st_mtime_ns
    script = LOAD_CACHE + textwrap.dedent(f"""
        mod, path, hit = cache.load_module("shared", {SOURCE!r})
        print(hit, path, mod.X)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, MIXFORGE_CACHE_DIR=str(root)),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", str(path), "1"]
    assert path.stat().st_mtime_ns == mtime


def test_a_corrupt_file_is_reported_and_regenerated(root):
    path, _ = cache.write_module("c", SOURCE)
    path.write_text("import os\nos.remove('/')  # never run\n")
    with pytest.warns(cache.CorruptCacheWarning, match="does not match its hash"):
        mod, again, hit = cache.load_module("c", SOURCE)
    assert again == path and not hit and mod.X == 1 and path.read_text() == SOURCE


def test_concurrent_writers_leave_one_intact_file(root):
    script = LOAD_CACHE + textwrap.dedent("""
        for _ in range(20):
            cache.write_module("race", "Y = 2\\n" * 5000)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, MIXFORGE_CACHE_DIR=str(root)))
             for _ in range(3)]
    assert all(p.wait() == 0 for p in procs)
    files = [p for p in (root / "kernels").iterdir() if p.suffix == ".py"]
    assert len(files) == 1 and files[0].read_text() == "Y = 2\n" * 5000
