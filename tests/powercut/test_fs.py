"""The power-cut file system itself: first its model (plain data, no FUSE),
then through a real FUSE mount with real system calls -- what survives a
cut, what does not, and how the kernel hands fsync, O_DSYNC, RWF_DSYNC and
O_DIRECT to a FUSE daemon."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.powercut import PowerCutError, PowerCutFS, fuse_unavailable
from tests.powercut.model import SECTOR, Model

# -- the model ----------------------------------------------------------------------


def _file(m: Model, path: str = "/f", *, durable_name: bool = True):
    f = m.create(path, 0o644)
    if durable_name:
        m.fsync(m.lookup("/").ino, False)
    return f


def test_model_unsynced_write_is_gone_after_a_cut_and_a_synced_one_stays():
    m = Model(seed=1)
    f = _file(m)
    m.write(f.ino, 0, b"durable")
    m.fsync(f.ino, datasync=True)
    m.write(f.ino, 7, b"+lost")
    assert m.read(f.ino, 0, 100) == b"durable+lost"
    report = m.cut()
    assert m.read(f.ino, 0, 100) == b"durable"
    assert report["writes_dropped"] == 1 and report["bytes_dropped"] == 5 and report["size_changes_dropped"] == 1


def test_model_an_overwrite_not_synced_reverts_to_the_old_bytes():
    m = Model()
    f = _file(m)
    m.write(f.ino, 0, b"a" * 10000)
    m.fsync(f.ino, False)
    m.write(f.ino, 5000, b"b" * 100)
    m.cut()
    assert m.read(f.ino, 0, 20000) == b"a" * 10000


def test_model_a_dsync_write_makes_only_its_own_range_durable():
    m = Model()
    f = _file(m)
    m.write(f.ino, 0, b"x" * 100)                  # pending
    m.write(f.ino, 200, b"y" * 100, dsync=True)    # RWF_DSYNC / O_DSYNC
    m.cut()
    assert m.read(f.ino, 0, 1000) == bytes(200) + b"y" * 100


def test_model_size_changes_are_pending_like_writes():
    m = Model()
    f = _file(m)
    m.write(f.ino, 0, b"z" * 5000)
    m.fsync(f.ino, False)
    m.truncate(f.ino, 10)
    m.fallocate(f.ino, 0, 0, 1 << 20)
    assert m.file(f.ino).size == 1 << 20
    assert m.read(f.ino, 0, 20) == b"z" * 10 + bytes(10)    # truncated bytes read back as zeros
    m.cut()
    assert m.file(f.ino).size == 5000 and m.read(f.ino, 0, 5000) == b"z" * 5000


@pytest.mark.parametrize("tear", ["sector", "byte"])
def test_model_a_tear_keeps_a_prefix_of_the_last_unsynced_write(tear):
    for seed in range(30):
        m = Model(seed=seed)
        f = _file(m)
        m.write(f.ino, 0, b"h" * 100)
        m.fsync(f.ino, False)
        m.write(f.ino, 100, b"earlier, dropped whole")
        data = bytes(range(256)) * 16                   # 4 KiB, not synced: the victim
        m.write(f.ino, 1000, data)
        report = m.cut(tear)
        kept = report["torn"]["kept"]
        assert 0 < kept < len(data)
        if tear == "sector":
            assert (1000 + kept) % SECTOR == 0
        size = m.file(f.ino).size
        assert size == 1000 + kept
        got = m.read(f.ino, 0, size)
        assert got[:100] == b"h" * 100 and got[100:1000] == bytes(900) and got[1000:] == data[:kept]


def test_model_a_tear_never_brings_back_bytes_a_later_durable_write_replaced():
    """The journal's pattern: zeros written ahead without a sync, then
    frames written over them with RWF_DSYNC. A tear of the zeros (still the
    last write not durable) must not wipe the frames."""
    for seed in range(20):
        m = Model(seed=seed)
        f = _file(m)
        m.fallocate(f.ino, 0, 0, 1 << 20)
        m.fsync(f.ino, False)
        m.write(f.ino, 4096, bytes(256 << 10))                 # zero ahead, not synced
        m.write(f.ino, 4096, b"F" * 1000, dsync=True)          # frames, durable
        m.write(f.ino, 5096, b"G" * 500, dsync=True)
        report = m.cut("sector")
        assert report["torn"]["length"] == 256 << 10
        assert m.read(f.ino, 4096, 1500) == b"F" * 1000 + b"G" * 500


def test_model_a_tear_of_an_interrupted_write_keeps_part_of_it():
    m = Model(seed=3)
    f = _file(m)
    from tests.powercut.model import PendingWrite
    report = m.cut("byte", interrupted=PendingWrite(f.ino, 0, b"q" * 50))
    assert report["torn"]["interrupted"] and 0 < report["torn"]["kept"] < 50
    assert m.read(f.ino, 0, 100) == b"q" * report["torn"]["kept"]


def test_model_a_create_without_a_directory_fsync_is_undone():
    m = Model()
    m.mkdir("/d", 0o755)
    m.fsync(m.lookup("/").ino, False)              # /d itself is durable
    f = m.create("/d/new", 0o644)
    m.write(f.ino, 0, b"data")
    m.fsync(f.ino, False)                          # the file's data is durable, its name is not
    report = m.cut()
    assert m.listdir("/d") == []
    assert report["entries"] == {"/d/new": "create"}
    assert f.ino not in m.nodes


def test_model_a_create_with_a_directory_fsync_stays_and_a_new_directory_needs_its_parent_fsynced():
    m = Model()
    m.mkdir("/d", 0o755)                           # parent not fsync'd
    f = m.create("/d/new", 0o644)
    m.fsync(m.lookup("/d").ino, False)             # only /d is
    m.cut()
    assert m.listdir("/") == []                    # /d and all in it are gone
    m.mkdir("/d", 0o755)
    m.fsync(m.lookup("/").ino, False)
    f = m.create("/d/new", 0o644)
    m.fsync(m.lookup("/d").ino, False)
    m.cut()
    assert m.listdir("/d") == ["new"] and m.file(m.lookup("/d/new").ino).size == 0


def test_model_rename_and_unlink_without_a_directory_fsync_are_undone():
    m = Model()
    a = _file(m, "/a")
    m.write(a.ino, 0, b"old")
    m.fsync(a.ino, False)
    b = _file(m, "/b")
    m.rename("/a", "/c")
    m.unlink("/b")
    assert sorted(m.listdir("/")) == ["c"]
    report = m.cut()
    assert sorted(m.listdir("/")) == ["a", "b"]
    assert m.read(m.lookup("/a").ino, 0, 10) == b"old" and m.lookup("/b").ino == b.ino
    assert report["entries"] == {"/a": "unlink", "/b": "unlink", "/c": "create"}


def test_model_tmp_fsync_rename_dirfsync_is_atomic_and_durable():
    m = Model()
    old = _file(m, "/cfg")
    m.write(old.ino, 0, b"v1")
    m.fsync(old.ino, False)
    tmp = m.create("/cfg.tmp", 0o644)
    m.write(tmp.ino, 0, b"v2")
    m.fsync(tmp.ino, False)
    m.rename("/cfg.tmp", "/cfg")
    m.cut()                                            # before the directory fsync: the old file
    assert m.read(m.lookup("/cfg").ino, 0, 10) == b"v1" and sorted(m.listdir("/")) == ["cfg"]


def test_model_sparse_storage_keeps_a_preallocated_segment_cheap():
    m = Model()
    f = _file(m)
    m.fallocate(f.ino, 0, 0, 16 << 20)
    m.write(f.ino, 0, bytes(256 << 10))               # zeroing ahead stores nothing
    m.write(f.ino, 0, b"SG" + bytes(8))
    m.fsync(f.ino, True)
    assert len(m.file(f.ino).dur) == 1 and m.file(f.ino).dur_size == 16 << 20


# -- through FUSE ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """One mount per mode, shared by the module's tests (each works in its own directory)."""
    reason = fuse_unavailable()
    if reason:
        pytest.skip(f"power-cut file system unavailable: {reason}")
    base = tmp_path_factory.mktemp("powercut")
    started: dict[str, PowerCutFS] = {}

    def get(mode: str = "direct_io") -> PowerCutFS:
        if mode not in started:
            fs = PowerCutFS(base / mode, seed=7, page_cache=(mode == "page_cache"),
                            refuse_direct=(mode == "refuse_direct"))
            try:
                fs.start()
            except PowerCutError as exc:
                pytest.skip(f"cannot mount the power-cut FUSE file system here: {exc}")
            started[mode] = fs
        return started[mode]

    yield get
    for fs in started.values():
        fs.stop()


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_dir(fs: PowerCutFS, name: str):
    d = fs.path / name
    d.mkdir()
    _fsync_dir(fs.path)
    return d


def _write(path, data: bytes, *, flags: int = 0, sync: str | None = None, offset: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        os.pwrite(fd, data, offset)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["direct_io", "page_cache"])
def test_fuse_unsynced_write_is_gone_after_a_cut_and_synced_ones_stay(mounts, mode, request):
    fs = mounts(mode)
    d = _durable_dir(fs, request.node.name.replace("[", "-").rstrip("]"))
    _write(d / "fsynced", b"A" * 3000, sync="fsync")
    _write(d / "fdatasynced", b"B" * 3000, sync="fdatasync")
    _write(d / "lost", b"C" * 3000)
    _fsync_dir(d)                                   # the names are durable; "lost"'s data is not
    _write(d / "fsynced", b"late", offset=3000)     # appended, never synced
    assert (d / "lost").read_bytes() == b"C" * 3000  # read back (and, with page_cache, cached)
    assert (d / "fsynced").stat().st_size == 3004
    report = fs.power_cut()
    assert (d / "fsynced").read_bytes() == b"A" * 3000
    assert (d / "fdatasynced").read_bytes() == b"B" * 3000
    assert (d / "lost").read_bytes() == b""         # no page cache served what the daemon dropped
    assert report["writes_dropped"] == 2 and report["bytes_dropped"] == 3004


@pytest.mark.parametrize("mode", ["direct_io", "page_cache"])
def test_fuse_how_the_kernel_sends_rwf_dsync_o_dsync_and_o_direct(mounts, mode, request):
    """Found out here (Linux 6.x): with FOPEN_DIRECT_IO a RWF_DSYNC write, or
    any write on an O_DSYNC/O_SYNC file, arrives as one FUSE_WRITE whose
    flags carry O_DSYNC (or O_SYNC) and no FUSE_FSYNC follows, so the daemon
    must honour the flag; through the page cache the kernel also sends
    FUSE_FSYNC (datasync for O_DSYNC) after the write. O_DIRECT opens are
    passed to the daemon, which may refuse them."""
    fs = mounts(mode)
    d = _durable_dir(fs, request.node.name.replace("[", "-").rstrip("]"))
    seen = fs.stats()["seen"]

    def delta():
        nonlocal seen
        now = fs.stats()["seen"]
        out = {k: now[k] - seen[k] for k in now if now[k] != seen[k]}
        seen = now
        return out

    fd = os.open(d / "direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    buf = mmap.mmap(-1, 4096)                      # O_DIRECT wants aligned memory
    buf[:4] = b"dsyn"
    assert delta() == {"open_o_direct": 1}
    os.pwritev(fd, [buf], 0, os.RWF_DSYNC)         # what the journal does
    sent = delta()
    assert sent["write"] == 1 and sent["write_flag_o_dsync"] == 1 and sent["write_flag_o_direct"] == 1
    assert sent.get("fdatasync", 0) == (0 if mode == "direct_io" else 1)
    buf[:4] = b"lost"
    os.pwritev(fd, [buf], 4096)                    # O_DIRECT alone is not durable
    assert "write_flag_o_dsync" not in delta()
    os.close(fd)
    _write(d / "odsync", b"o_dsync", flags=os.O_DSYNC)
    assert delta()["write_flag_o_dsync"] == 1
    _write(d / "osync", b"o_sync", flags=os.O_SYNC)
    assert delta()["write_flag_o_sync"] == 1
    _fsync_dir(d)
    fs.power_cut()
    assert (d / "direct").read_bytes() == b"dsyn" + bytes(4092)
    assert (d / "odsync").read_bytes() == b"o_dsync"
    assert (d / "osync").read_bytes() == b"o_sync"


def test_fuse_o_direct_can_be_refused_like_tmpfs(mounts):
    fs = mounts("refuse_direct")
    d = _durable_dir(fs, "refused")
    with pytest.raises(OSError) as exc:
        os.open(d / "x", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    assert exc.value.errno == errno.EINVAL
    _write(d / "y", b"buffered", sync="fdatasync")
    _fsync_dir(d)
    fs.power_cut()
    assert (d / "y").read_bytes() == b"buffered"


@pytest.mark.parametrize("tear", ["sector", "byte"])
def test_fuse_a_torn_tail(mounts, tear):
    fs = mounts()
    d = _durable_dir(fs, f"torn-{tear}")
    _write(d / "log", b"H" * 600, sync="fdatasync")
    _fsync_dir(d)
    data = b"".join(i.to_bytes(2, "big") for i in range(2048))   # 4 KiB, not synced
    _write(d / "log", data, offset=600)
    report = fs.power_cut(tear)
    kept = report["torn"]["kept"]
    assert 0 < kept < len(data) and report["torn"]["path"] == f"/torn-{tear}/log"
    if tear == "sector":
        assert (600 + kept) % SECTOR == 0
    assert (d / "log").read_bytes() == b"H" * 600 + data[:kept]


def test_fuse_create_rename_unlink_without_a_directory_fsync_are_undone(mounts):
    fs = mounts()
    d = _durable_dir(fs, "names")
    _write(d / "kept", b"k", sync="fsync")
    _write(d / "renamed", b"r", sync="fsync")
    _write(d / "unlinked", b"u", sync="fsync")
    _fsync_dir(d)
    _write(d / "created", b"c", sync="fsync")      # data synced, name not
    os.rename(d / "renamed", d / "moved")
    os.unlink(d / "unlinked")
    (d / "subdir").mkdir()
    report = fs.power_cut()
    assert sorted(os.listdir(d)) == ["kept", "renamed", "unlinked"]
    assert (d / "renamed").read_bytes() == b"r" and (d / "unlinked").read_bytes() == b"u"
    assert report["entries"] == {"/names/created": "create", "/names/moved": "create",
                                 "/names/renamed": "unlink", "/names/unlinked": "unlink",
                                 "/names/subdir": "create"}
    _write(d / "created", b"c", sync="fsync")
    _fsync_dir(d)
    fs.power_cut()
    assert (d / "created").read_bytes() == b"c"


def test_fuse_the_power_fails_during_a_write(mounts, tmp_path):
    """freeze_at_write: the write in flight never completes (the writer gets
    EIO once the power is cut) and a tear keeps part of it."""
    fs = mounts()
    d = _durable_dir(fs, "inflight")
    _write(d / "log", b"", sync="fsync")
    _fsync_dir(d)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "os.pwritev(fd, [b'x' * 8192], 0, os.RWF_DSYNC)\n"
        "print('acknowledged', flush=True)\n"), str(d / "log")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fs.freeze_at_write("/inflight/log", timeout=10) == "/inflight/log"
        time.sleep(0.2)
        assert writer.poll() is None                  # blocked in its write: the power is out
        report = fs.cut("sector")
        out, err = writer.communicate(timeout=10)
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
    assert "acknowledged" not in out and "Input/output error" in err
    fs.remount()
    kept = report["torn"]["kept"]
    assert report["torn"]["interrupted"] and report["inflight_writes"] == 1 and kept % SECTOR == 0
    assert (d / "log").read_bytes() == b"x" * kept

