"""The files a daemon leaves for the one that takes its device over (ublkmig.state), and
the checks ``serve --recover`` makes with them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ublkmig import state
from ublkmig.daemon import check_superseded, check_takeover, recovery
from ublkmig.errors import UserError
from ublkmig.migration import MigrationRecord
from ublkmig.migration.record import Recorder


def record(mode: str, cut_over: str | None = None, **fields: object) -> dict[str, object]:
    """A migration record as a daemon saves it."""
    return {
        "device": "/dev/ublkb5", "source": "/s.img", "dest": "/d.img", "mode": mode,
        "chunk_size": 1 << 20, "speed": None, "no_cutover": False, "verify": False,
        "direct": False, "fallback_wait_ms": 20.0, "yield": True, "dest_timeout": 30.0,
        "phase": "copying", "reach": 3, "chunks": 8, "cut_over": cut_over, "updated": 1.0,
        "deltas": None, **fields,
    }  # fmt: skip


def test_write_read_remove(run_dir: Path) -> None:
    path = state.device_path(3)
    assert path.parent == run_dir and state.read(path) is None
    state.write(path, {"image": "/a.img", "pid": 1})
    assert state.read(path) == {"version": state.VERSION, "image": "/a.img", "pid": 1}
    state.write(path, {"image": "/b.img", "pid": 2})  # replaced whole
    assert state.read(path) == {"version": state.VERSION, "image": "/b.img", "pid": 2}
    assert sorted(p.name for p in run_dir.iterdir()) == ["ublkb3.json"]  # no temporary left
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    # torn or foreign: never taken for a missing record
    path.write_text("{not json")
    with pytest.raises(state.Damaged, match="is damaged"):
        state.read(path)
    path.write_text('{"version": 999}')
    with pytest.raises(state.Damaged, match="not a state file of this ublkmig"):
        state.read(path)
    state.remove(path, state.migration_path(3))  # (a missing one is fine)
    assert not path.exists()
    state.write(path, {"image": "/a.img"})
    state.write(state.migration_path(3), {"mode": "dbt"})
    state.forget(3)
    assert list(run_dir.iterdir()) == []


def test_threads_writing_one_state_file_at_once(run_dir: Path) -> None:
    """The cutover's record and the sampler's are saved from two threads: neither may fail
    for the other, and the file always holds one whole record (a shared temporary name
    gave ENOENT on the second rename, or one thread's record in the other's file)."""
    path = state.migration_path(4)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(200):
                state.write(path, {"writer": n, "i": i, "pad": "x" * (n * 3000)})
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    d = state.read(path)
    assert d is not None and d["i"] == 199 and d["pad"] == "x" * (d["writer"] * 3000)
    assert [p.name for p in run_dir.iterdir()] == [path.name]  # no temporary left


def test_recorder_saves_one_record_at_a_time() -> None:
    """Each save makes its record and writes it before another begins: the last record
    made is the one in the file (the cutover's, not the sampler's copy from before it)."""
    active, most, saved = [0], [0], []
    lock = threading.Lock()

    def on_state(rec: object) -> None:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.01)
        saved.append(rec)
        with lock:
            active[0] -= 1

    rec = Recorder(on_state, device="/dev/ublkb4", log=None)
    made: list[int] = []

    def make() -> int:
        made.append(len(made))
        return made[-1]

    threads = [threading.Thread(target=lambda: [rec.save(make) for _ in range(5)])
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and saved == made == list(range(15))


def test_takeover_checks(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, dest = tmp_path / "disk.img", tmp_path / "dest.img"
    image.write_bytes(b"x")
    dest.write_bytes(b"y")
    monkeypatch.setattr(recovery, "ublk_device_exists", lambda dev_id: False)
    with pytest.raises(UserError, match="cannot recover /dev/ublkb5: there is no ublk device 5"):
        check_takeover(5, image, force=True)
    monkeypatch.setattr(recovery, "ublk_device_exists", lambda dev_id: dev_id == 5)
    # nothing left behind: nothing says which image is the disk
    with pytest.raises(UserError, match="no record of what /dev/ublkb5 served"):
        check_takeover(5, image)
    check_takeover(5, image, force=True)
    state.device_path(5).write_text('{"image": "/x.i')  # torn
    with pytest.raises(state.Damaged):
        check_takeover(5, image, force=True)
    state.write(state.device_path(5), {"image": str(image), "pid": 1})
    check_takeover(5, image)
    check_takeover(5, tmp_path / "." / "disk.img")  # the same file, another spelling
    with pytest.raises(UserError) as e:
        check_takeover(5, dest)
    assert str(e.value) == f"/dev/ublkb5 was serving {image}: recover it with that image"

    # after a migration to an NBD export: that export (`serve nbd://...`), by its URI
    state.write(state.device_path(5), {"image": "nbd://h/e", "pid": 1})
    with pytest.raises(UserError) as e:
        check_takeover(5, image)
    assert str(e.value) == "/dev/ublkb5 was serving nbd://h/e: recover it with that image"
    with pytest.raises(UserError, match="was serving nbd://h/e: recover it"):
        check_takeover(5, "nbd://h/other")
    check_takeover(5, "nbd://h/e")

    state.write(state.device_path(5), {"image": str(image), "pid": 1})
    for mode in ("mirror", "dbt", "auto"):  # resumable: the image holds everything
        state.write(state.migration_path(5), record(mode))
        check_takeover(5, image)
    state.write(state.migration_path(5), record("snapshot"))
    with pytest.raises(UserError, match="died during a snapshot-mode migration"):
        check_takeover(5, image)
    state.migration_path(5).write_text("")  # torn: the snapshot refusal is not skipped
    with pytest.raises(state.Damaged):
        check_takeover(5, image)
    # cut over (or in sync and switching): the destination holds everything, deltas or not
    state.write(state.device_path(5), {"image": str(dest), "pid": 1})
    state.write(state.migration_path(5), record("snapshot", "intent"))
    check_takeover(5, dest)
    # a record missing what decides which image is the disk, or with it garbled, fails closed
    state.write(state.device_path(5), {"image": str(image), "pid": 1})
    for bad in ({k: v for k, v in record("dbt").items() if k != "cut_over"},
                record("dbt", "maybe"), record("snapshot", reach=-1), record("dbt", dest=7)):
        state.write(state.migration_path(5), bad)
        with pytest.raises(state.Damaged, match="ublkb5.migration.json is damaged"):
            check_takeover(5, image)


def test_migration_record_round_trip_and_older_records() -> None:
    rec = MigrationRecord.from_dict(record("snapshot", "intent", deltas="/s.img.d"))
    assert rec.switched and rec.yields and rec.deltas == "/s.img.d"
    assert MigrationRecord.from_dict(rec.to_dict()) == rec
    assert rec.to_dict()["yield"] is True and "yields" not in rec.to_dict()
    # written before these fields existed: their meaning then
    old = {k: v for k, v in record("dbt").items()
           if k not in ("yield", "dest_timeout", "direct", "deltas", "updated")}  # fmt: skip
    old["cut_over"] = False  # (a flag before the cutover had two steps)
    rec = MigrationRecord.from_dict(old)
    assert (rec.yields, rec.dest_timeout, rec.direct, rec.deltas) == (True, 30.0, False, None)
    assert not rec.switched
    assert MigrationRecord.from_dict({**old, "cut_over": True}).switched


def test_superseded_images(state_dir: Path, tmp_path: Path) -> None:
    """A cutover marks the image it left, durably and outside /run: `serve` of it is refused,
    under any spelling, until a migration back to it makes it the disk again; another file
    at that path later is another image."""
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    old.write_bytes(b"o")
    new.write_bytes(b"n")
    assert state.superseded_by(str(old)) is None
    state.mark_superseded(str(old), str(new), "/dev/ublkb4")
    assert [p.parent.name for p in state_dir.rglob("*.json")] == ["superseded"]
    for spelling in (old, tmp_path / "." / "old.img"):
        mark = state.superseded_by(str(spelling))
        assert mark is not None and mark["superseded_by"] == str(new)
    (tmp_path / "link").symlink_to(old)
    assert state.superseded_by(str(tmp_path / "link")) is not None
    assert state.superseded_by(str(new)) is None
    with pytest.raises(UserError) as e:
        check_superseded(old)
    assert str(e.value) == (
        f"{old} is not the disk any more: /dev/ublkb4 migrated to {new}, which holds every "
        "write since; serve that (or pass --force to serve this old copy)"
    )
    os.rename(old, tmp_path / "kept.img")  # a new file where the old image was
    old.write_bytes(b"o")
    assert state.superseded_by(str(old)) is None
    os.replace(tmp_path / "kept.img", old)
    state.unmark(str(tmp_path / "link"))
    assert state.superseded_by(str(old)) is None
    check_superseded(old)
    # a mark that cannot be read might be this image's: fail closed
    state.mark_superseded(str(new), str(old), "/dev/ublkb4")
    next(state_dir.rglob("*.json")).write_text("{")
    with pytest.raises(state.Damaged, match="serve with --force"):
        check_superseded(old)
