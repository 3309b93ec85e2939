/* SPDX-License-Identifier: MIT */
/*
 * Snapshot mode's deltas: creating them, copy on write into the active one, a new
 * generation, and folding them back into the source.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "migrate/migrate.h"

/* fsync the folder holding path: a name created in it is durable */
int mig_sync_dir_of(const char *path)
{
	char dir[PATH_MAX];
	const char *slash = strrchr(path, '/');
	int fd, ret = 0;

	if (!slash)
		snprintf(dir, sizeof(dir), ".");
	else
		snprintf(dir, sizeof(dir), "%.*s", (int)(slash == path ? 1 : slash - path), path);
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0)
		ret = -errno;
	if (fd >= 0)
		close(fd);
	return ret;
}

/* Snapshot: create the delta of generation g (DELTA_PATH.g, sparse), its name
 * durable before the layer map can name it. */
int mig_open_delta(struct ubm_migration *m, unsigned g)
{
	struct ubm_backend *d = &m->delta[g - 1];
	char path[PATH_MAX];
	int fd, err;

	snprintf(path, sizeof(path), "%s.%u", m->delta_path, g);
	fd = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0) {
		err = errno;
		if (err == EEXIST)
			return ubm_fail(EEXIST, "the delta file %s exists already (left by a snapshot "
					"migration that did not end?)", path);
		return ubm_fail(err, "cannot create the delta file %s: %s", path, strerror(err));
	}
	memset(d, 0, sizeof(*d));
	m->delta_created[g - 1] = true;
	d->fd = fd;
	err = ftruncate(fd, (off_t)m->size) < 0 ? errno : -mig_sync_dir_of(path);
	if (err) {
		unlink(path);
		close(fd);
		d->fd = -1;
		m->delta_created[g - 1] = false;
		return ubm_fail(err, "cannot size the delta file %s: %s", path, strerror(err));
	}
	d->ops = &ubm_file_backend_ops;
	d->size = m->size;
	d->logical_bs = m->t->source.logical_bs;
	d->file_index = mig_file_index(SLOT_DELTA0 + g - 1);
	d->can_discard = true;
	m->t->be[SLOT_DELTA0 + g - 1] = d;
	return mig_install(m, SLOT_DELTA0 + g - 1, d);
}

static __thread void *cow_buf;
static __thread size_t cow_len;

/* A chunk-sized buffer of this thread's (copy on write, fold-back), or NULL. */
static void *chunk_buffer(struct ubm_migration *m)
{
	if (cow_len < m->chunk_size) {
		free(cow_buf);
		cow_len = 0;
		if (posix_memalign(&cow_buf, 4096, m->chunk_size))
			return NULL;
		cow_len = m->chunk_size;
	}
	return cow_buf;
}
/* pread/pwrite a whole range, retrying short transfers. */
static int copy_range(int from, int to, uint64_t off, size_t len, void *buf)
{
	for (size_t done = 0; done < len;) {
		ssize_t n = pread(from, (char *)buf + done, len - done, (off_t)(off + done));

		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	for (size_t done = 0; done < len;) {
		ssize_t n = pwrite(to, (char *)buf + done, len - done, (off_t)(off + done));

		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	return 0;
}

/*
 * Snapshot copy-on-write: bring chunk c into the active delta before a write
 * lands in it.  Runs on a queue thread holding a reference on c (so the
 * copier leaves c alone); the COW bit keeps a second queue out (it parks).
 * mirrored: the write goes to the destination too (the tail).  Returns 0, 1
 * (park) or -errno.
 */
int mig_snapshot_cow(struct ubm_migration *m, uint64_t c, bool mirrored)
{
	unsigned active = A_LOAD(&m->gen), from;
	uint32_t s = A_LOAD(&m->chunk[c]), len = chunk_len(m, c);
	int ret;

	for (;;) {
		if (s & CH_COW) {
			if ((s & CH_WAITERS) ||
			    __atomic_compare_exchange_n(&m->chunk[c], &s, s | CH_WAITERS, false,
							__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
				return 1;
			continue;
		}
		if (__atomic_compare_exchange_n(&m->chunk[c], &s, s | CH_COW, false,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			break;
	}
	ret = 0;
	if (A_LOAD(&m->newest[c]) != active) {  /* not done by the queue we waited for */
		from = A_LOAD(&m->newest[c]);
		void *buf = chunk_buffer(m);
		int fd = from ? m->delta[from - 1].fd : m->t->source.fd;

		/* a hole stays a hole: the delta's chunk was never written */
		if (!buf)
			ret = -ENOMEM;
		else if (!ubm_file_is_hole(fd, c << m->chunk_shift, len))
			ret = copy_range(fd, m->delta[active - 1].fd, c << m->chunk_shift, len, buf);
		/* the copy is complete (in the delta's page cache): the map may
		 * name it; a FLUSH makes both durable, the data first */
		if (ret == 0)
			ret = ubm_layer_map_add(&m->map, c, active);
		if (ret == 0) {
			A_STORE(&m->newest[c], (uint8_t)active);
			A_ADD(&m->cow_chunks, 1);
			A_ADD(&m->delta_chunks, 1);
			/* the chunk changed layer: a pass must take it even if the
			 * write that caused this parks and never lands; but not in
			 * the tail, where the write is mirrored: the copy holds what
			 * the destination holds for a clean chunk, and dirtying it
			 * would spread dirt over every chunk the guest writes to
			 * faster than the passes clean it */
			if (!mirrored)
				mig_mark_dirty(m, c);
		}
	}
	s = __atomic_fetch_and(&m->chunk[c], ~(CH_COW | CH_WAITERS), __ATOMIC_SEQ_CST);
	if (s & CH_WAITERS)
		ubm_target_ring_bells(m->t, ACT_RETRY_PARKED);
	return ret;
}

UBM_EXPORT int ubm_mig_new_delta(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	unsigned next;
	int ret;

	ret = mig_check(m, false);
	if (ret)
		return ret;
	if (A_LOAD(&m->mode) != UBM_MIG_SNAPSHOT)
		return ubm_fail(EINVAL, "not a snapshot migration");
	next = m->gen + 1;
	if (next > UBM_MAX_DELTAS)
		return ubm_fail(ENOSPC, "all %d deltas are in use", UBM_MAX_DELTAS);
	ret = mig_open_delta(m, next);  /* before the pause: keep it short */
	if (ret < 0)
		return ret;
	/* writes routed to the old delta must be done before any write can
	 * copy a chunk from it into the new one */
	ubm_mig_pause(t);
	A_STORE(&m->gen, next);
	A_STORE(&m->delta_chunks, 0);
	return ubm_mig_resume(t);
}

/*
 * Fold the deltas back into the source (a migration that ends without a
 * cutover): each chunk's newest layer, with guest I/O paused.  On failure the
 * device serves on through the layers.
 */
int mig_fold_back(struct ubm_migration *m)
{
	struct ubm_target *t = m->t;
	void *buf;
	uint64_t folded[FOLD_BATCH];
	unsigned nfolded = 0;
	int ret = 0;

	ubm_mig_pause(t);
	for (uint64_t c = 0; c <= m->nr_chunks && ret == 0; c++) {
		unsigned g = c < m->nr_chunks ? A_LOAD(&m->newest[c]) : 0;

		/* free the folded chunks' room in every delta (the source may
		 * need it: their filesystem may be full), once the source holds
		 * them durably: until then the deltas and the map are the
		 * guest's data, should the daemon die */
		if (nfolded == FOLD_BATCH || (c == m->nr_chunks && nfolded)) {
			if (fdatasync(t->source.fd) < 0) {
				ret = -errno;
				break;
			}
			/* ... and the map says so (generation 0: the source),
			 * durably: a fold-back after a crash must not copy a
			 * punched chunk over the source.  A map that failed
			 * (what failed the deltas, maybe) cannot say so: then
			 * the chunks stay in the deltas too */
			int mret = 0;

			for (unsigned i = 0; i < nfolded && mret == 0; i++)
				mret = ubm_layer_map_add(&m->map, folded[i], 0);
			if (mret == 0)
				mret = ubm_layer_map_commit(&m->map,
							    ubm_layer_map_mark(&m->map), NULL, 0);
			for (unsigned i = 0; mret == 0 && i < nfolded; i++) {
				for (unsigned d = 0; d < A_LOAD(&m->gen); d++)
					fallocate(m->delta[d].fd,
						  FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
						  (off_t)(folded[i] << m->chunk_shift),
						  chunk_len(m, folded[i]));
			}
			nfolded = 0;
		}
		if (!g)
			continue;
		buf = chunk_buffer(m);
		ret = buf ? copy_range(m->delta[g - 1].fd, t->source.fd, c << m->chunk_shift,
				       chunk_len(m, c), buf)
			  : -ENOMEM;
		if (ret < 0)
			break;
		A_STORE(&m->newest[c], 0);
		folded[nfolded++] = c;
	}
	if (ret == 0 && fdatasync(t->source.fd) < 0)
		ret = -errno;
	if (ret == 0)
		m->deltas_done = true;  /* the source holds it all, durably */
	if (ret < 0) {
		/* serve on through the layers; writes no longer wait for a
		 * fold-back that cannot happen (they fail as they would) */
		A_STORE(&m->delta_failed, DELTA_UNFOLDABLE);
		ubm_mig_resume(t);
		return ubm_fail(ret, "folding the deltas back into the source failed: %s",
				strerror(-ret));
	}
	return 0;
}
