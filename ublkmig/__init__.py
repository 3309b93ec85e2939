"""ublkmig: serve a disk image as a Linux block device through ublk + io_uring, and migrate it
live."""

__version__ = "0.1.0"
