"""The adapter disk cache between the object store and the engine: verified, atomic, hash-keyed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.domain.completions.adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles


def make_source(tmp_path: Path, payload: bytes) -> tuple[Path, str]:
    src = tmp_path / f"src-{hashlib.sha256(payload).hexdigest()[:8]}"
    src.mkdir()
    (src / WEIGHTS_FILE).write_bytes(payload)
    (src / CONFIG_FILE).write_text("{}")
    return src, hashlib.sha256(payload).hexdigest()


class Store:
    """Copies files the way the registry's download does; counts calls; can be made to serve bad bytes."""

    def __init__(self) -> None:
        self.calls = 0
        self.corrupt = False

    def download(self, adapter: SimpleNamespace, dest: Path) -> None:
        self.calls += 1
        shutil.copy(adapter.src / WEIGHTS_FILE, dest / WEIGHTS_FILE)
        shutil.copy(adapter.src / CONFIG_FILE, dest / CONFIG_FILE)
        if self.corrupt:
            (dest / WEIGHTS_FILE).write_bytes(b"tampered")


async def test_download_once_then_reuse_and_refetch_when_missing(tmp_path: Path) -> None:
    src, sha = make_source(tmp_path, b"weights-1")
    store = Store()
    files = AdapterFiles(tmp_path / "cache", store.download)
    adapter = SimpleNamespace(sha256=sha, src=src)
    folder = await files.ensure(adapter)
    assert (folder / WEIGHTS_FILE).read_bytes() == b"weights-1" and folder.name == sha
    await files.ensure(adapter)
    assert files.local_folder(sha) == str(folder)
    assert store.calls == 1
    shutil.rmtree(folder)
    # The engine's loader thread finds it gone and fetches again from the store.
    assert Path(files.local_folder(sha)).joinpath(WEIGHTS_FILE).read_bytes() == b"weights-1"
    assert store.calls == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


async def test_wrong_bytes_from_the_store_never_become_a_cache_folder(tmp_path: Path) -> None:
    src, sha = make_source(tmp_path, b"weights-2")
    store = Store()
    store.corrupt = True
    files = AdapterFiles(tmp_path / "cache", store.download)
    with pytest.raises(ValueError, match="hash"):
        await files.ensure(SimpleNamespace(sha256=sha, src=src))
    assert list((tmp_path / "cache").iterdir()) == []


async def test_a_tampered_cache_folder_is_replaced(tmp_path: Path) -> None:
    src, sha = make_source(tmp_path, b"weights-3")
    files = AdapterFiles(tmp_path / "cache", Store().download)
    (tmp_path / "cache" / sha).mkdir(parents=True)
    (tmp_path / "cache" / sha / WEIGHTS_FILE).write_bytes(b"planted")
    folder = await files.ensure(SimpleNamespace(sha256=sha, src=src))
    assert (folder / WEIGHTS_FILE).read_bytes() == b"weights-3"


async def test_unknown_or_removed_or_malformed_hashes_are_refused(tmp_path: Path) -> None:
    src, sha = make_source(tmp_path, b"weights-4")
    files = AdapterFiles(tmp_path / "cache", Store().download)
    with pytest.raises(FileNotFoundError):
        files.local_folder(sha)
    folder = await files.ensure(SimpleNamespace(sha256=sha, src=src))
    files.remove(sha)
    assert not folder.exists()
    with pytest.raises(FileNotFoundError):
        files.local_folder(sha)
    for bad in ("../../etc", "A" * 64, sha[:-1] + "/"):
        with pytest.raises(ValueError):
            files.folder(bad)


async def test_the_disk_budget_trims_least_recently_used_but_never_recent_ones(tmp_path: Path) -> None:
    store = Store()
    adapters = []
    for i in range(3):
        src, sha = make_source(tmp_path, bytes([i]) * 1000)
        adapters.append(SimpleNamespace(sha256=sha, src=src))
    # Room for two adapters (1000 bytes of weights + 2 of config each).
    files = AdapterFiles(tmp_path / "cache", store.download, max_bytes=2100, min_age_s=0.0)
    for a in adapters:
        await files.ensure(a)
    assert not files.folder(adapters[0].sha256).exists()
    assert files.folder(adapters[1].sha256).exists() and files.folder(adapters[2].sha256).exists()
    assert files.disk_bytes() <= 2100
    # The trimmed one is fetched again when the engine asks for it; now adapter 1 is the oldest.
    assert Path(files.local_folder(adapters[0].sha256)).is_dir()
    assert not files.folder(adapters[1].sha256).exists()
    assert store.calls == 4

    # Recently used adapters are kept even over budget: the engine may be reading them.
    busy = AdapterFiles(tmp_path / "cache2", store.download, max_bytes=1, min_age_s=3600.0)
    for a in adapters:
        await busy.ensure(a)
    assert all(busy.folder(a.sha256).exists() for a in adapters)


async def test_folders_from_an_earlier_run_count_and_go_first(tmp_path: Path) -> None:
    src, sha = make_source(tmp_path, b"x" * 1000)
    old_src, old_sha = make_source(tmp_path, b"y" * 1000)
    files = AdapterFiles(tmp_path / "cache", Store().download)
    await files.ensure(SimpleNamespace(sha256=old_sha, src=old_src))
    (tmp_path / "cache" / ".tmp-deadbeef-1").mkdir()  # a download cut short by a crash
    restarted = AdapterFiles(tmp_path / "cache", Store().download, max_bytes=1500, min_age_s=0.0)
    assert restarted.disk_bytes() >= 1000
    await restarted.ensure(SimpleNamespace(sha256=sha, src=src))
    assert not restarted.folder(old_sha).exists() and restarted.folder(sha).exists()
    assert not (tmp_path / "cache" / ".tmp-deadbeef-1").exists()
