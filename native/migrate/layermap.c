/* SPDX-License-Identifier: MIT */
/*
 * Snapshot mode's layer map on disk: which delta holds each chunk's newest
 * data, so that a daemon that dies (or a host that loses power) leaves the
 * guest's acknowledged writes findable.  The file is PREFIX.map beside the
 * deltas PREFIX.1, PREFIX.2, ...; a header, then one record per copy on write
 * (chunk c moved into generation g).  Records are appended, never rewritten:
 * a chunk's last record names its newest layer; a torn last record (a crash
 * while writing it) is ignored by the reader (ublkmig.snapshot).
 *
 * Two kinds of crash, two promises:
 *  - The daemon dies (SIGKILL, a bug), the kernel lives: every write it
 *    acknowledged is found.  A record is written (to the page cache) as soon
 *    as its chunk's copy on write is complete, before the write that caused
 *    it is issued, so the page cache holds the record of every chunk an
 *    acknowledged write touched.
 *  - The host loses power or reboots: every write acknowledged before a FLUSH
 *    that was acknowledged is found.  The page cache may have written a record
 *    back before its chunk's copied data, so after a reboot only the first
 *    `committed` records are trusted: ubm_layer_map_commit(upto) makes the
 *    deltas durable (fdatasync), then the records, and only then raises
 *    `committed` in the header (and makes that durable).  A FLUSH (or FUA
 *    write) takes its mark when it is routed and commits up to it before it
 *    is acknowledged: every chunk a write completed before it touched was
 *    copied on write before that write was issued, so its record is below the
 *    mark.
 * The header names the boot (the kernel's boot_id): the reader trusts every
 * record if the host has not rebooted since, the committed ones otherwise.
 *
 * A fold-back into the source appends records of generation 0 (the chunk is
 * back in the source, durably) and commits them before it punches the chunks
 * out of the deltas: a fold-back again after a crash skips them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "migrate/migrate.h"

struct layer_map_header {
	char magic[8];          /* LAYERMAP_MAGIC */
	uint32_t version;       /* 1 */
	uint32_t record_size;   /* sizeof(struct layer_map_record) */
	uint64_t size;          /* the device's size */
	uint64_t chunk_size;
	uint64_t committed;     /* records durable after their data (a power cut keeps these) */
	uint8_t boot_id[16];    /* the boot that wrote it (/proc/sys/kernel/random/boot_id) */
	uint8_t pad[8];
};

struct layer_map_record {
	uint32_t magic;         /* LAYERMAP_RECORD */
	uint32_t gen;           /* the delta that now holds the chunk's newest data */
	uint64_t chunk;
};

#define LAYERMAP_MAGIC "UBMLAYER"
#define LAYERMAP_RECORD 0x4c4d4255u  /* "UBML" */

_Static_assert(sizeof(struct layer_map_header) == 64, "header layout");
_Static_assert(sizeof(struct layer_map_record) == 16, "record layout");

#define COMMITTED_OFF offsetof(struct layer_map_header, committed)

/* The kernel's boot_id (a UUID in text) as 16 bytes; zeroes if unknown. */
static void read_boot_id(uint8_t id[16])
{
	char text[64] = "";
	int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
	unsigned n = 0;

	memset(id, 0, 16);
	if (fd < 0)
		return;
	if (read(fd, text, sizeof(text) - 1) < 0)
		text[0] = 0;
	close(fd);
	for (const char *p = text; *p && n < 32; p++) {
		int v = *p >= '0' && *p <= '9' ? *p - '0' : *p >= 'a' && *p <= 'f' ? *p - 'a' + 10 : -1;

		if (v < 0)
			continue;
		id[n / 2] = (uint8_t)(id[n / 2] << 4 | v);
		n++;
	}
}

static int write_full(int fd, const void *buf, size_t len, off_t off)
{
	for (size_t done = 0; done < len;) {
		ssize_t n = pwrite(fd, (const char *)buf + done, len - done, off + (off_t)done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	return 0;
}

int ubm_layer_map_create(struct ubm_layer_map *lm, const char *path, uint64_t size,
			 uint64_t chunk_size)
{
	struct layer_map_header h;
	int ret;

	memset(lm, 0, sizeof(*lm));
	lm->fd = -1;
	pthread_mutex_init(&lm->lock, NULL);
	lm->fd = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
	if (lm->fd < 0) {
		ret = errno;
		if (ret == EEXIST)
			return ubm_fail(EEXIST, "%s exists: a snapshot migration of this image that "
					"did not end left it (serving the image again folds it "
					"back)", path);
		return ubm_fail(ret, "cannot create the layer map %s: %s", path, strerror(ret));
	}
	lm->created = true;
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, LAYERMAP_MAGIC, sizeof(h.magic));
	h.version = 1;
	h.record_size = sizeof(struct layer_map_record);
	h.size = size;
	h.chunk_size = chunk_size;
	read_boot_id(h.boot_id);
	ret = write_full(lm->fd, &h, sizeof(h), 0);
	if (ret == 0 && fdatasync(lm->fd) < 0)
		ret = -errno;
	if (ret < 0)
		return ubm_fail(-ret, "cannot write the layer map %s: %s", path, strerror(-ret));
	return 0;
}

int ubm_layer_map_add(struct ubm_layer_map *lm, uint64_t chunk, uint32_t gen)
{
	struct layer_map_record r = { LAYERMAP_RECORD, gen, chunk };
	int ret = 0;

	pthread_mutex_lock(&lm->lock);
	if (lm->error) {
		ret = lm->error;
		goto out;
	}
	/* in the file at once (the page cache): a daemon that dies leaves it */
	ret = write_full(lm->fd, &r, sizeof(r),
			 (off_t)(sizeof(struct layer_map_header) + lm->n * sizeof(r)));
	if (ret < 0) {
		lm->error = ret;
		goto out;
	}
	__atomic_store_n(&lm->n, lm->n + 1, __ATOMIC_RELEASE);
out:
	pthread_mutex_unlock(&lm->lock);
	return ret;
}

uint64_t ubm_layer_map_mark(struct ubm_layer_map *lm)
{
	return __atomic_load_n(&lm->n, __ATOMIC_ACQUIRE);
}

int ubm_layer_map_commit(struct ubm_layer_map *lm, uint64_t upto, const int *fds, unsigned nfds)
{
	uint64_t committed = upto;
	int ret = 0;

	if (lm->fd < 0)
		return 0;
	pthread_mutex_lock(&lm->lock);
	if (lm->error) {
		ret = lm->error;  /* a map that failed once is not trusted to be whole */
		goto out;
	}
	if (upto <= lm->committed)
		goto out;
	/* the data, then the records, then the count that trusts them */
	for (unsigned i = 0; i < nfds && ret == 0; i++) {
		if (fds[i] >= 0 && fdatasync(fds[i]) < 0)
			ret = -errno;
	}
	if (ret == 0 && fdatasync(lm->fd) < 0)
		ret = -errno;
	if (ret == 0)
		ret = write_full(lm->fd, &committed, sizeof(committed), (off_t)COMMITTED_OFF);
	if (ret == 0 && fdatasync(lm->fd) < 0)
		ret = -errno;
	if (ret == 0)
		lm->committed = upto;
	else
		lm->error = ret;
out:
	pthread_mutex_unlock(&lm->lock);
	return ret;
}

void ubm_layer_map_close(struct ubm_layer_map *lm)
{
	if (lm->fd >= 0)
		close(lm->fd);
	lm->fd = -1;
	lm->n = lm->committed = 0;
	pthread_mutex_destroy(&lm->lock);
}
