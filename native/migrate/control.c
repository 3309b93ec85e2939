/* SPDX-License-Identifier: MIT */
/*
 * A migration's life: start (the destination opened and checked, the routing
 * installed), mode and speed, pause and resume, reconnect, the end (finish), the
 * counters.
 */
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "migrate/migrate.h"

/* ---- control ----------------------------------------------------------------- */

/*
 * Wait for the migration's guest requests to drain.  A simulator has no
 * thread of its own: its caller (who must be the one calling) drives it.
 */
void mig_wait_inflight(struct ubm_migration *m)
{
	while (__atomic_load_n(&m->inflight, __ATOMIC_SEQ_CST)) {
		for (unsigned i = 0; i < m->t->nr_queues; i++) {
			struct ubm_queue *q = &m->t->queues[i];

			if (!q->dev) {
				io_uring_submit(&q->ring);
				ubm_queue_reap(q);
			}
		}
		usleep(50);
	}
}

static int same_storage(const struct ubm_backend *a, const struct ubm_backend *b)
{
	struct stat sa, sb;

	if (fstat(a->fd, &sa) < 0 || fstat(b->fd, &sb) < 0)
		return 0;
	if (S_ISBLK(sa.st_mode) && S_ISBLK(sb.st_mode))
		return sa.st_rdev == sb.st_rdev;
	return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

void mig_free(struct ubm_migration *m)
{
	if (!m)
		return;
	if (m->t->dest.ops && m->t->dest.ops->detach)
		m->t->dest.ops->detach(&m->t->dest, &m->copier);
	ubm_queue_ring_exit(&m->copier);
	for (unsigned i = 0; i < MAX_COPY_DEPTH; i++) {
		free(m->slots[i].buf);
		free(m->slots[i].check_buf);
	}
	for (unsigned g = 0; g < UBM_MAX_DELTAS; g++) {
		if (m->delta[g].ops)
			m->delta[g].ops->close(&m->delta[g]);
	}
	if (m->map_open) {
		/* the map first: without it the deltas mean nothing, while a
		 * map naming a missing delta fails a recovery (closed) */
		if (m->deltas_done) {
			char path[PATH_MAX];

			if (m->map.created) {
				snprintf(path, sizeof(path), "%s.map", m->delta_path);
				unlink(path);
			}
			for (unsigned g = 1; g <= UBM_MAX_DELTAS; g++) {
				snprintf(path, sizeof(path), "%s.%u", m->delta_path, g);
				if (m->delta_created[g - 1])
					unlink(path);
			}
		}
		ubm_layer_map_close(&m->map);
	}
	free(m->copier.ios);
	free(m->chunk);
	free(m->dirty);
	free(m->dest_written);
	free(m->unflushed);
	free(m->hot);
	free(m->newest);
	free(m->ios);
	free(m->delta_path);
	free(m);
}

int ubm_fixed_migration_files = -1;

/* The fixed-file index for a migration backend at `slot`, or -1 for a plain fd. */
int mig_file_index(unsigned slot)
{
	static int from_kernel = -1;
	struct utsname u;
	unsigned major = 0, minor = 0;

	if (ubm_fixed_migration_files >= 0)
		return ubm_fixed_migration_files ? (int)FILE_OF_SLOT(slot) : -1;
	if (from_kernel < 0) {
		/* the io_uring resource rework of 6.13 puts files per request */
		from_kernel = uname(&u) == 0 && sscanf(u.release, "%u.%u", &major, &minor) == 2 &&
			(major > 6 || (major == 6 && minor >= 13));
	}
	return from_kernel ? (int)FILE_OF_SLOT(slot) : -1;
}

/* Install backend `be` at `slot` in every ring (queues and copier), or with
 * be NULL empty the slot; a backend named by its plain fd leaves it empty. */
int mig_install(struct ubm_migration *m, unsigned slot, struct ubm_backend *be)
{
	int fd = be && be->file_index >= 0 ? be->fd : -1;
	int ret = ubm_queue_set_file(&m->copier, FILE_OF_SLOT(slot), fd);

	if (ret == 0)
		ret = ubm_target_set_file(m->t, slot, fd);
	return ret;
}

UBM_EXPORT int ubm_mig_start(struct ubm_target *t, const struct ubm_mig_config *cfg)
{
	struct ubm_backend *dest = &t->dest;
	struct ubm_migration *m;
	int ret;

	if (mig_of(t))
		return ubm_fail(EBUSY, "a migration is already running on this device");
	if (t->primary != SLOT_SOURCE)
		return ubm_fail(EINVAL, "this device was migrated already");
	/* the copier, copy on write, verify and fold-back read the source by
	 * its fd: a file or a block device */
	if (!ubm_backend_is_file(&t->source))
		return ubm_fail(EOPNOTSUPP, "%s: migrating a device that serves an NBD export is "
				"not supported", t->source_path);
	if (cfg->mode > UBM_MIG_SNAPSHOT)
		return ubm_fail(EINVAL, "unknown migration mode %u", cfg->mode);
	if (cfg->chunk_size < (64u << 10) || cfg->chunk_size > (64u << 20) ||
	    (cfg->chunk_size & (cfg->chunk_size - 1)))
		return ubm_fail(EINVAL, "chunk size must be a power of two from 64 KiB to 64 MiB");
	if (cfg->copy_depth > MAX_COPY_DEPTH)
		return ubm_fail(EINVAL, "copy depth must be at most %d", MAX_COPY_DEPTH);
	/* a request then spans at most two chunks: at most two layers to read */
	if (cfg->mode == UBM_MIG_SNAPSHOT && cfg->chunk_size < t->max_io)
		return ubm_fail(EINVAL, "snapshot mode needs chunks of at least %u KiB (the largest "
				"request)", t->max_io >> 10);

	memset(dest, 0, sizeof(*dest));
	dest->ops = ubm_backend_for(cfg->dest_path);
	dest->fd = -1;
	dest->file_index = mig_file_index(SLOT_DEST);
	dest->logical_bs = t->source.logical_bs;
	dest->direct = cfg->direct;
	dest->timeout_ms = cfg->dest_timeout_ms;
	dest->via_fd = cfg->dest_fd;
	ret = dest->ops->open(dest, cfg->dest_path);
	if (ret < 0)
		return ret;
	if (same_storage(&t->source, dest)) {
		dest->ops->close(dest);
		return ubm_fail(EINVAL, "%s: the destination is the source", cfg->dest_path);
	}
	if (dest->size < t->source.size) {
		dest->ops->close(dest);
		return ubm_fail(ENOSPC, "%s: the destination (%llu bytes) is smaller than the source "
				"(%llu bytes)", cfg->dest_path, (unsigned long long)dest->size,
				(unsigned long long)t->source.size);
	}
	if (dest->max_io && (cfg->chunk_size > dest->max_io || t->max_io > dest->max_io)) {
		dest->ops->close(dest);
		return ubm_fail(EINVAL, "%s: the destination takes at most %u KiB at a time; use "
				"smaller chunks", cfg->dest_path, dest->max_io >> 10);
	}

	m = calloc(1, sizeof(*m));
	if (!m) {
		dest->ops->close(dest);
		return ubm_fail(ENOMEM, "out of memory");
	}
	m->t = t;
	m->router.ops = &ubm_mig_router_ops;
	m->size = t->source.size;
	m->chunk_size = cfg->chunk_size;
	m->chunk_shift = (unsigned)__builtin_ctzll(cfg->chunk_size);
	m->nr_chunks = (m->size + m->chunk_size - 1) >> m->chunk_shift;
	m->mode = cfg->mode;
	m->speed = cfg->speed;
	m->dest_zeroed = cfg->dest_zeroed;
	m->check_below = cfg->dest_zeroed ? 0 : cfg->check_below;
	m->copy_depth = cfg->copy_depth ? cfg->copy_depth : 4;
	m->last_flush_ns = ubm_now_ns();
	m->busy_depth = cfg->busy_depth && cfg->busy_depth < m->copy_depth ? cfg->busy_depth
									    : m->copy_depth;
	m->chunk = calloc(m->nr_chunks, sizeof(*m->chunk));
	m->dirty = calloc((m->nr_chunks + 63) / 64, sizeof(*m->dirty));
	m->dest_written = calloc((m->nr_chunks + 63) / 64, sizeof(*m->dest_written));
	m->unflushed = calloc((m->nr_chunks + 63) / 64, sizeof(*m->unflushed));
	m->hot = calloc(m->nr_chunks, 1);
	m->newest = calloc(m->nr_chunks, 1);
	m->copier.ios = calloc(m->copy_depth, sizeof(*m->copier.ios));
	/* the router's state of every guest request (route.c) */
	for (unsigned i = 0; i < t->nr_queues; i++) {
		if (t->queues[i].depth > m->ios_per_queue)
			m->ios_per_queue = t->queues[i].depth;
	}
	m->ios = calloc((size_t)t->nr_queues * m->ios_per_queue + 1, sizeof(*m->ios));
	m->copier.bell_fd = -1;
	if (cfg->delta_path) {
		m->delta_path = strdup(cfg->delta_path);
	} else if (asprintf(&m->delta_path, "%s.ublkmig-delta", t->source_path) < 0) {
		m->delta_path = NULL;
	}
	ret = (!m->chunk || !m->dirty || !m->dest_written || !m->unflushed || !m->hot ||
	       !m->newest || !m->copier.ios || !m->ios || !m->delta_path)
		? ubm_fail(ENOMEM, "out of memory") : 0;
	for (unsigned i = 0; ret == 0 && i < m->copy_depth; i++) {
		if (posix_memalign(&m->slots[i].buf, 4096, m->chunk_size) ||
		    (m->check_below && posix_memalign(&m->slots[i].check_buf, 4096, m->chunk_size)))
			ret = ubm_fail(ENOMEM, "out of memory for copy buffers");
	}
	/* the copier's own ring, with the same file slots as the queues' */
	m->copier.tgt = t;
	m->copier.depth = m->copy_depth;
	m->copier.path = UBM_PATH_COPY;
	m->copier.backend_done = mig_copier_backend_done;
	if (ret == 0)
		ret = ubm_queue_ring_init(&m->copier, m->copy_depth * 4, -1, false, false);
	/* per-ring backend state (NBD: a connection for each queue and the copier) */
	for (unsigned i = 0; ret == 0 && dest->ops->attach && i <= t->nr_queues; i++)
		ret = dest->ops->attach(dest, i < t->nr_queues ? &t->queues[i] : &m->copier, SLOT_DEST);
	if (ret == 0)
		ret = mig_install(m, SLOT_DEST, dest);
	if (ret == 0 && cfg->mode == UBM_MIG_SNAPSHOT) {
		char path[PATH_MAX];

		/* the map before the first delta: a delta without a map is
		 * garbage, a map without its delta fails a recovery (closed) */
		snprintf(path, sizeof(path), "%s.map", m->delta_path);
		ret = ubm_layer_map_create(&m->map, path, m->size, m->chunk_size);
		m->map_open = true;
		if (ret == 0 && (ret = mig_sync_dir_of(path)) < 0)
			ret = ubm_fail(-ret, "cannot sync the folder of %s: %s", path, strerror(-ret));
		if (ret == 0)
			ret = mig_open_delta(m, 1);
		m->gen = 1;
	}
	if (ret < 0) {
		m->deltas_done = true;  /* nothing the guest wrote is in them yet */
		for (unsigned slot = SLOT_DEST; slot < UBM_MAX_BACKENDS; slot++) {
			t->be[slot] = NULL;
			ubm_target_set_file(t, slot, -1);
		}
		mig_free(m);
		dest->ops->close(dest);
		return ret;
	}
	t->be[SLOT_DEST] = dest;
	pthread_mutex_lock(&t->router_lock);
	A_STORE(&t->router, &m->router);
	pthread_mutex_unlock(&t->router_lock);
	/* Writes routed before the migration hold no chunk references: the
	 * copier would not wait for them.  Once every queue routes through the
	 * migration, wait for those to finish before anything is copied. */
	ubm_target_sync(t);
	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		while (__atomic_load_n(&q->plain_inflight, __ATOMIC_ACQUIRE)) {
			if (!q->dev) {  /* a simulator: its caller drives it */
				io_uring_submit(&q->ring);
				ubm_queue_reap(q);
			}
			usleep(50);
		}
	}
	return 0;
}

int mig_check(const struct ubm_migration *m, bool before_cutover)
{
	if (!m)
		return ubm_fail(ENOENT, "no migration is running");
	if (before_cutover && A_LOAD(&m->cut_over))
		return ubm_fail(EINVAL, "the migration has cut over already");
	return 0;
}

UBM_EXPORT int ubm_mig_set_mode(struct ubm_target *t, uint32_t mode)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);

	if (ret)
		return ret;
	if (A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT) {
		/* its tail: MIRROR mirrors the writes to the active delta too,
		 * SNAPSHOT stops that (they still dirty their chunks) */
		if (mode != UBM_MIG_MIRROR && mode != UBM_MIG_SNAPSHOT)
			return ubm_fail(EINVAL, "a snapshot migration mirrors or not, nothing else");
	} else if (mode > UBM_MIG_DBT) {
		return ubm_fail(EINVAL, "only mirror and dirty tracking switch modes");
	}
	/* the cutover's window relies on every write being mirrored (cutover.c) */
	if (A_LOAD(&m->switching))
		return ubm_fail(EBUSY, "a cutover is under way");
	if (A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT)
		A_STORE(&m->snap_mirror, mode == UBM_MIG_MIRROR);
	else
		A_STORE(&m->mode, mode);
	return 0;
}

UBM_EXPORT int ubm_mig_set_speed(struct ubm_target *t, uint64_t bytes_per_second)
{
	struct ubm_migration *m;

	pthread_mutex_lock(&t->router_lock);
	m = mig_of(t);
	if (m)
		A_STORE(&m->speed, bytes_per_second);
	pthread_mutex_unlock(&t->router_lock);
	return m ? 0 : ubm_fail(ENOENT, "no migration is running");
}

UBM_EXPORT int ubm_mig_abort(struct ubm_target *t)
{
	struct ubm_migration *m;

	pthread_mutex_lock(&t->router_lock);
	m = mig_of(t);
	if (m)
		A_STORE(&m->abort, 1);
	pthread_mutex_unlock(&t->router_lock);
	return m ? 0 : ubm_fail(ENOENT, "no migration is running");
}

UBM_EXPORT int ubm_mig_pause(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);

	if (ret)
		return ret;
	m->pause_start_ns = ubm_now_ns();
	__atomic_store_n(&m->paused, 1, __ATOMIC_SEQ_CST);
	mig_wait_inflight(m);
	return 0;
}

UBM_EXPORT int ubm_mig_resume(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);

	if (ret)
		return ret;
	if (!A_LOAD(&m->paused))
		return 0;
	__atomic_store_n(&m->paused, 0, __ATOMIC_SEQ_CST);
	A_STORE(&m->last_pause_ns, ubm_now_ns() - m->pause_start_ns);
	ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	return 0;
}

UBM_EXPORT int ubm_mig_finish(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret = mig_check(m, false);
	bool cut_over;

	if (ret)
		return ret;
	cut_over = A_LOAD(&m->cut_over);
	if (!cut_over && A_LOAD(&m->mode) == UBM_MIG_SNAPSHOT) {
		/* the guest's writes since the start live in the deltas */
		ret = mig_fold_back(m);

		if (ret < 0)
			return ret;
	}
	pthread_mutex_lock(&t->router_lock);
	__atomic_store_n(&t->router, NULL, __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&t->router_lock);
	if (A_LOAD(&m->paused)) {
		__atomic_store_n(&m->paused, 0, __ATOMIC_SEQ_CST);
		A_STORE(&m->last_pause_ns, ubm_now_ns() - m->pause_start_ns);
	}
	/* requests parked by the migration are routed again without it */
	ubm_target_ring_bells(t, ACT_RETRY_PARKED);
	/* no queue is inside the router any more ... */
	ubm_target_sync(t);
	/* ... and the requests it routed are done */
	mig_wait_inflight(m);
	for (unsigned slot = cut_over ? SLOT_DELTA0 : SLOT_DEST; slot < UBM_MAX_BACKENDS; slot++) {
		if (!t->be[slot])
			continue;
		/* cancelled or failed: the source stays; let go of the rest */
		t->be[slot] = NULL;
		ubm_target_set_file(t, slot, -1);
	}
	if (!cut_over)
		t->dest.ops->close(&t->dest);
	else
		m->deltas_done = true;  /* the destination is the disk (its record is durable) */
	mig_free(m);
	return 0;
}

UBM_EXPORT int ubm_mig_reconnect(struct ubm_target *t)
{
	struct ubm_migration *m = mig_of(t);
	int ret;

	ret = mig_check(m, true);
	if (ret)
		return ret;
	if (!t->dest.ops->reconnect)
		return ubm_fail(EOPNOTSUPP, "the destination has no connections to restore");
	if (A_LOAD(&m->switching))
		return ubm_fail(EBUSY, "a cutover is under way");
	ret = t->dest.ops->reconnect(&t->dest);
	if (ret < 0)
		return ret;
	/* What the destination acknowledged since its last successful flush is
	 * not trusted: its server may have lost it with the connection (a
	 * write-back cache, a restart).  Those chunks are copied again; a
	 * chunk not copied yet will be, in full (dest_written keeps it from
	 * being skipped as zeroes). */
	for (uint64_t c = 0; c < m->nr_chunks; c++) {
		if (!bit_test(m->unflushed, c))
			continue;
		__atomic_fetch_and(&m->unflushed[c / 64], ~(1ull << (c % 64)), __ATOMIC_SEQ_CST);
		bit_set(m->dest_written, c);
		if (A_LOAD(&m->chunk[c]) & CH_COPIED)
			mig_mark_dirty(m, c);
	}
	/* Requests routed until now that fail (on the lost connections, which
	 * they may still find dead) are old news: the chunks they touch go
	 * dirty, and that is all.  Those routed from now on find the new
	 * connections.  What the lost connections failed is dirty (or not
	 * copied): the error can go. */
	A_ADD(&m->epoch, 1);
	__atomic_store_n(&m->error, 0, __ATOMIC_SEQ_CST);
	return 0;
}

UBM_EXPORT int ubm_mig_get_stats(struct ubm_target *t, struct ubm_mig_stats *out)
{
	struct ubm_migration *m;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&t->router_lock);
	m = mig_of(t);
	if (!m) {
		pthread_mutex_unlock(&t->router_lock);
		return ubm_fail(ENOENT, "no migration is running");
	}
	out->size = m->size;
	out->chunk_size = m->chunk_size;
	out->nr_chunks = m->nr_chunks;
	out->chunks_copied = A_LOAD(&m->chunks_copied);
	out->cursor = A_LOAD(&m->cursor);
	out->dirty_chunks = A_LOAD(&m->dirty_count);
	out->hot_chunks = A_LOAD(&m->hot_count);
	out->bytes_copied = A_LOAD(&m->bytes_copied);
	out->bytes_skipped = A_LOAD(&m->bytes_skipped);
	out->bytes_read = A_LOAD(&m->bytes_read);
	out->passes = A_LOAD(&m->passes);
	out->mirrored_writes = A_LOAD(&m->mirrored_writes);
	out->tracked_writes = A_LOAD(&m->tracked_writes);
	out->parked = A_LOAD(&m->parked);
	out->dest_errors = A_LOAD(&m->dest_errors);
	out->max_latency_ns = A_LOAD(&m->max_latency_ns);
	out->cutover_latency_ns = A_LOAD(&m->cutover_latency_ns);
	out->last_pause_ns = A_LOAD(&m->last_pause_ns);
	out->error = A_LOAD(&m->error);
	out->mode = A_LOAD(&m->mode);
	out->paused = A_LOAD(&m->paused);
	out->cut_over = A_LOAD(&m->cut_over);
	out->generation = A_LOAD(&m->gen);
	out->delta_chunks = A_LOAD(&m->delta_chunks);
	out->cow_chunks = A_LOAD(&m->cow_chunks);
	out->delta_failed = A_LOAD(&m->delta_failed);
	out->dest_down = t->dest.ops->down ? t->dest.ops->down(&t->dest) : 0;
	out->mirror_waits = A_LOAD(&m->mirror_waits);
	out->mirror_wait_ns = A_LOAD(&m->mirror_wait_ns);
	out->bytes_matched = A_LOAD(&m->bytes_matched);
	out->yield_ns = A_LOAD(&m->yield_ns);
	out->cutover_pause_ns = A_LOAD(&m->cutover_pause_ns);
	out->ahead_writes = A_LOAD(&m->ahead_writes);
	out->chunk_wait_ns = A_LOAD(&m->chunk_wait_ns);
	out->pause_wait_ns = A_LOAD(&m->pause_wait_ns);
	{
		/* (two loads, not one snapshot: a mean that is off by a write at most) */
		uint64_t n = A_LOAD(&m->dest_waiting), since = A_LOAD(&m->dest_waiting_since);
		uint64_t now = ubm_now_ns();

		out->dest_waiting = n;
		out->dest_waiting_ns = n && since / n < now ? now - since / n : 0;
	}
	pthread_mutex_unlock(&t->router_lock);
	return 0;
}
