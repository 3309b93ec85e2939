"""What a dead daemon left behind, checked before serving: an image a completed migration
superseded (``serve IMAGE`` refuses it), a device to take over (``serve IMAGE --recover N``:
IMAGE must be what it served, and nothing may be lost with it), and a snapshot migration's
deltas, folded back into the image."""

from __future__ import annotations

from pathlib import Path

from ublkmig import snapshot, state
from ublkmig.client import Client
from ublkmig.daemon.checks import Image, same_image
from ublkmig.daemon.options import ServeOptions
from ublkmig.errors import UblkmigError, UserError
from ublkmig.log import get_logger
from ublkmig.migration.record import MigrationRecord, read_record


def check_superseded(image: Path) -> None:
    """``serve IMAGE``: UserError if a completed migration left IMAGE (another is the disk)."""
    mark = state.superseded_by(str(image))
    if mark is not None:
        raise UserError(
            f"{image} is not the disk any more: {mark.get('device', 'its device')} migrated to "
            f"{mark.get('superseded_by')}, which holds every write since; serve that (or pass "
            "--force to serve this old copy)"
        )


def ublk_device_exists(dev_id: int) -> bool:
    """Whether ublk device DEV_ID exists (its block or its char device node)."""
    return Path(f"/dev/ublkb{dev_id}").exists() or Path(f"/dev/ublkc{dev_id}").exists()


def check_takeover(dev_id: int, image: Path | str, force: bool = False) -> None:
    """``serve IMAGE --recover N``: UserError unless IMAGE is what /dev/ublkbN's dead daemon
    served (as its state files say), and nothing was lost with it.  Without a record of what
    it served nothing can be concluded: refused unless ``force``."""
    node = f"/dev/ublkb{dev_id}"
    try:
        info = Client(dev_id, timeout=5.0).info()
    except UblkmigError:  # nobody answers: as expected
        pass
    else:
        raise UserError(f"{node} is served by a live ublkmig daemon (pid {info.get('pid')}): "
                        f"`ublkmig stop {node}` stops it")
    dev = state.read(state.device_path(dev_id))
    if dev is None and not ublk_device_exists(dev_id):
        raise UserError(f"cannot recover {node}: there is no ublk device {dev_id}")
    if dev is None and not force:
        raise UserError(
            f"no record of what {node} served ({state.device_path(dev_id)} is missing, as after "
            "its daemon failed to save it): pass --force if you know it was this image"
        )
    if dev is not None:
        served = str(dev.get("image", ""))
        if not same_image(served, image):
            raise UserError(f"{node} was serving {served}: recover it with that image")
    mig = read_record(dev_id)
    if mig is not None and not mig.switched and mig.mode == "snapshot":
        prefix = _snapshot_prefix(mig, image)
        if snapshot.read_map(prefix) is None:
            raise UserError(
                f"{node}'s daemon died during a snapshot-mode migration, and its layer map "
                f"{snapshot.map_path(prefix)} is gone: the guest's writes since it began are "
                f"not in the image; `ublkmig stop {node}` fails the guest's I/O instead"
            )


def _snapshot_prefix(mig: MigrationRecord | None, image: Path) -> Path:
    """Where a snapshot migration of ``image`` kept its deltas: as its record says, or the
    default place beside the image."""
    if mig is not None and mig.deltas is not None:
        return Path(mig.deltas)
    return snapshot.delta_prefix(image, None)


def fold_back_snapshot(opts: ServeOptions, image: Image) -> None:
    """Before serving: a snapshot migration whose daemon died left the guest's writes in its
    deltas, named by a layer map; fold them back into the image (then the map and deltas
    go).  Serving the image without them would lose those writes."""
    mig = None
    if opts.recover is not None:
        mig = read_record(opts.recover)
        if mig is not None and mig.switched:
            return  # the destination is the disk; its source's deltas do not matter
    prefix = _snapshot_prefix(mig, Path(image.path))
    lm = snapshot.read_map(prefix)
    if lm is None:
        # deltas without a map are garbage (it is created before them, removed first)
        if any(snapshot.leftovers(prefix)):
            snapshot.remove(prefix)
        return
    if opts.read_only:
        raise UserError(f"{image.path} has the deltas of a snapshot migration that did not end "
                        f"({snapshot.map_path(prefix)}): serve it without --read-only once, to "
                        "fold them back")  # fmt: skip
    n = snapshot.fold_back(lm, image.fd, image.size)
    get_logger().info("snapshot.folded_back", image=str(image.path), chunks=n,
                      map=str(snapshot.map_path(prefix)))  # fmt: skip
