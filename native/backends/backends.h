/* SPDX-License-Identifier: MIT */
/*
 * Backends: where data lives.  Each fills the core's ops table (struct
 * ubm_backend_ops) in a file of its own: file.c (regular files and block
 * devices), nbd.c (an export of an NBD server: with nbd_wire.c and nbd_io.c);
 * delay.c, for tests, wraps another.
 */
#ifndef UBM_BACKENDS_H
#define UBM_BACKENDS_H

#include "core/core.h"

extern const struct ubm_backend_ops ubm_file_backend_ops;
extern const struct ubm_backend_ops ubm_nbd_backend_ops;

/* nbd://..., nbd+unix://... (and the TLS schemes, to refuse them clearly) */
bool ubm_is_nbd_uri(const char *path);

/* The backend that opens `path`: an NBD export for its URIs, else a file or a
 * block device. */
static inline const struct ubm_backend_ops *ubm_backend_for(const char *path)
{
	return ubm_is_nbd_uri(path) ? &ubm_nbd_backend_ops : &ubm_file_backend_ops;
}

/* Whether be reads and writes a file or block device by its fd (wrapped or
 * not): what copy on write, verify and fold-back need of a source. */
static inline bool ubm_backend_is_file(const struct ubm_backend *be)
{
	return be->ops->open == ubm_file_backend_ops.open;
}

/* Whether [off, off + len) of the file fd is a hole (SEEK_DATA finds no data
 * in it): it reads as zeroes, and nothing need copy it. */
bool ubm_file_is_hole(int fd, uint64_t off, uint64_t len);

/* Tests: hold every write, discard, write-zeroes and flush to be for ns
 * first (0: no longer); a file backend only (delay.c). */
int ubm_backend_set_delay(struct ubm_backend *be, uint64_t ns);

#endif
