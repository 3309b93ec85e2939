/* SPDX-License-Identifier: MIT */
/*
 * The copier: one pass over the chunks on its own ring, a few chunks in flight,
 * yielding the source to the guest and keeping to the speed limit.
 */
#include <fcntl.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "migrate/migrate.h"

static bool wanted(struct ubm_migration *m, uint64_t c, uint32_t pass)
{
	/* snapshot: the active delta is still taking writes, unmirrored (once
	 * they are mirrored, in its tail, a pass takes it as mirror mode's does) */
	if (pass != UBM_PASS_FINAL && m->gen && !A_LOAD(&m->snap_mirror) &&
	    A_LOAD(&m->newest[c]) == A_LOAD(&m->gen))
		return false;
	switch (pass) {
	case UBM_PASS_DIRTY:
		return is_dirty(m, c) && m->hot[c] < HOT_PASSES;
	default:
		return !(A_LOAD(&m->chunk[c]) & CH_COPIED) || is_dirty(m, c);
	}
}

static void unlock_chunk(struct ubm_migration *m, uint64_t c, bool copied)
{
	uint32_t s = A_LOAD(&m->chunk[c]), n;

	do {
		n = (s & ~(CH_LOCKED | CH_WAITERS)) | (copied ? CH_COPIED : 0);
	} while (!__atomic_compare_exchange_n(&m->chunk[c], &s, n, false, __ATOMIC_SEQ_CST,
					      __ATOMIC_SEQ_CST));
	if (copied && !(s & CH_COPIED))
		A_ADD(&m->chunks_copied, 1);
	if (s & CH_WAITERS)
		ubm_target_ring_bells(m->t, ACT_RETRY_PARKED);
}

static bool all_zero(const void *buf, size_t len)
{
	const uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++)
		if (p[i])
			return false;
	return true;
}

/* A copy step failed: the chunk stays (or goes) dirty, the slot is free. */
static int copy_failed(struct ubm_migration *m, unsigned i, int err)
{
	struct copy_slot *cs = &m->slots[i];

	mig_set_error(m, err);
	unlock_chunk(m, cs->chunk, false);
	mig_mark_dirty(m, cs->chunk);
	cs->state = CS_FREE;
	return err;
}

/* Queue a backend operation on the copier's ring for slot i (reads of the
 * destination while checking land in the slot's check buffer). */
static int copy_op(struct ubm_migration *m, unsigned i, unsigned be_slot, uint8_t op, int state)
{
	struct copy_slot *cs = &m->slots[i];
	struct ubm_io *io = &m->copier.ios[i];
	struct ubm_backend *be = m->t->be[be_slot];
	int ret;

	io->req = (struct ubm_req){
		.op = op, .offset = cs->chunk << m->chunk_shift, .len = chunk_len(m, cs->chunk),
		.buf = state == CS_CHECKING ? cs->check_buf : cs->buf, .buf_index = -1,
	};
	cs->state = state;
	if (be_slot == SLOT_DEST && op != UBLK_IO_OP_READ)
		bit_set(m->dest_written, cs->chunk);  /* even if the write fails half-way */
	ret = be->ops->queue_io(be, &m->copier, i, be_slot, &io->req);
	return ret < 0 ? copy_failed(m, i, ret) : 0;
}

/* The chunk in slot i is locked and idle on the guest side: start copying. */
static int copy_begin(struct ubm_migration *m, unsigned i)
{
	struct copy_slot *cs = &m->slots[i];
	uint64_t off = cs->chunk << m->chunk_shift;
	uint32_t len = chunk_len(m, cs->chunk);

	/* clear before reading: a write that lands after this re-dirties it */
	mig_clear_dirty(m, cs->chunk);
	cs->first_copy = !(A_LOAD(&m->chunk[cs->chunk]) & CH_COPIED);
	/* a mirrored write may have reached the destination's chunk before the
	 * copier (it is locked now: no other can come) */
	cs->fresh = m->dest_zeroed && cs->first_copy && !bit_test(m->dest_written, cs->chunk);
	cs->check = cs->first_copy && cs->chunk < m->check_below;
	cs->from = m->gen ? layer_slot(m, cs->chunk) : SLOT_SOURCE;
	if (ubm_file_is_hole(m->t->be[cs->from]->fd, off, len)) {
		/* a hole in the source */
		if (cs->fresh) {
			A_ADD(&m->bytes_skipped, len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		cs->zero = true;
		if (cs->check)
			return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_READ, CS_CHECKING);
		return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_WRITE_ZEROES, CS_WRITING);
	}
	return copy_op(m, i, cs->from, UBLK_IO_OP_READ, CS_READING);
}

/* Write slot i's chunk (read from the source, or a hole) to the destination. */
static int copy_write(struct ubm_migration *m, unsigned i)
{
	struct copy_slot *cs = &m->slots[i];

	return copy_op(m, i, SLOT_DEST, cs->zero ? UBLK_IO_OP_WRITE_ZEROES : UBLK_IO_OP_WRITE,
		       CS_WRITING);
}

/* A backend operation of copy slot i ended with cqe_res. */
static int copy_result(struct ubm_migration *m, unsigned i, unsigned be_slot, int cqe_res)
{
	struct copy_slot *cs = &m->slots[i];
	struct ubm_io *io = &m->copier.ios[i];
	struct ubm_backend *be = m->t->be[be_slot];
	int res = 0;

	if (be->ops->complete(be, &m->copier, i, be_slot, &io->req, cqe_res, &res))
		return 0;
	if (res < 0)
		return copy_failed(m, i, res);
	if (cs->state == CS_READING) {
		A_ADD(&m->bytes_read, io->req.len);
		cs->zero = all_zero(cs->buf, io->req.len);
		if (cs->zero && cs->fresh) {
			A_ADD(&m->bytes_skipped, io->req.len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		if (cs->check)
			return copy_op(m, i, SLOT_DEST, UBLK_IO_OP_READ, CS_CHECKING);
		return copy_write(m, i);
	}
	if (cs->state == CS_CHECKING) {
		/* the chunk is locked: neither side changed since the source was read */
		if (cs->zero ? all_zero(cs->check_buf, io->req.len)
			     : !memcmp(cs->buf, cs->check_buf, io->req.len)) {
			A_ADD(&m->bytes_matched, io->req.len);
			unlock_chunk(m, cs->chunk, true);
			cs->state = CS_FREE;
			return 0;
		}
		return copy_write(m, i);
	}
	A_ADD(&m->bytes_copied, io->req.len);
	bit_set(m->unflushed, cs->chunk);
	unlock_chunk(m, cs->chunk, true);
	cs->state = CS_FREE;
	return 0;
}

/* q->backend_done of the copier's ring (a failure is in m->error) */
void mig_copier_backend_done(struct ubm_queue *q, unsigned tag, unsigned slot, int res)
{
	copy_result((struct ubm_migration *)((char *)q - offsetof(struct ubm_migration, copier)), tag,
		    slot, res);
}

/*
 * The speed limit, a token bucket: a pass may have copied speed x (time since
 * *origin) bytes.  Credit saved while the copier was held up (guest writes on
 * its chunks, a busy machine) is capped at a tenth of a second's worth (at
 * least the chunks in flight): a copier that fell behind does not then burst
 * to catch up with the average, and a new speed applies from now on.
 * Returns 0 within the limit, else the time (ns) until the next chunk is.
 */
static uint64_t speed_wait(struct ubm_migration *m, double *origin, uint64_t pass_bytes)
{
	double speed = (double)A_LOAD(&m->speed), now, credit, cap;

	if (speed == 0)
		return 0;
	now = (double)ubm_now_ns() / 1e9;
	credit = speed * (now - *origin) - (double)pass_bytes;
	cap = speed / 10;
	if (cap < (double)(m->chunk_size * m->copy_depth))
		cap = (double)(m->chunk_size * m->copy_depth);
	if (credit > cap) {
		*origin = now - ((double)pass_bytes + cap) / speed;
		credit = cap;
	}
	return credit >= 0 ? 0 : (uint64_t)(-credit / speed * 1e9) + 1;
}

/* The copier starts (since == 0) or stops holding back for guest I/O: the
 * new start time, or 0 once the time held is added up. */
static uint64_t account_yield(struct ubm_migration *m, uint64_t since)
{
	uint64_t now = ubm_now_ns();

	if (!since)
		return now;
	A_ADD(&m->yield_ns, now - since);
	return 0;
}

/* Copy slots in use (a chunk locked, being read, checked or written). */
static unsigned slots_busy(const struct ubm_migration *m)
{
	unsigned n = 0;

	for (unsigned i = 0; i < m->copy_depth; i++)
		n += m->slots[i].state != CS_FREE;
	return n;
}

/* One pass's progress through the chunks (ubm_mig_copy_pass). */
struct pass {
	uint32_t kind;          /* UBM_PASS_* */
	uint64_t next;          /* the next chunk to look at */
	uint64_t copied;        /* chunks taken */
	uint64_t bytes;         /* ... their bytes (the speed limit's) */
	double origin;          /* the speed limit's clock, in seconds */
	uint64_t speed_wait;    /* held by the speed limit: for how long (ns) */
};

/*
 * Lock the next wanted chunks into free slots, as many as the pacer lets the
 * copier have busy (all of them while the guest is idle; while it is busy,
 * a burst of busy_depth chunks, then a rest: pacer.c).  Returns whether it
 * held back for the guest.
 */
static bool take_chunks(struct ubm_migration *m, struct pass *p)
{
	unsigned busy = slots_busy(m);
	unsigned limit = mig_pace(m, busy, ubm_now_ns(), ubm_target_completed(m->t));

	p->speed_wait = 0;
	for (unsigned i = 0; i < m->copy_depth; i++) {
		struct copy_slot *cs = &m->slots[i];

		if (cs->state != CS_FREE)
			continue;
		p->speed_wait = speed_wait(m, &p->origin, p->bytes);
		if (p->speed_wait)
			return false;  /* over the speed limit: wait for time to pass */
		while (p->next < m->nr_chunks && !wanted(m, p->next, p->kind))
			p->next++;
		if (p->next >= m->nr_chunks)
			return false;
		if (busy >= limit)
			return true;
		cs->chunk = p->next++;
		cs->state = CS_LOCKING;
		cs->t_start = ubm_now_ns();
		busy++;
		if (p->kind == UBM_PASS_DIRTY)
			m->hot[cs->chunk]++;
		__atomic_fetch_or(&m->chunk[cs->chunk], CH_LOCKED, __ATOMIC_SEQ_CST);
		p->bytes += chunk_len(m, cs->chunk);
		p->copied++;
	}
	return false;
}

/* Start copying the locked chunks whose guest writes have drained (with
 * stop, unlock them instead).  Returns how many still wait for writes. */
static unsigned start_locked(struct ubm_migration *m, bool stop, int *ret)
{
	unsigned locking = 0;

	for (unsigned i = 0; i < m->copy_depth; i++) {
		struct copy_slot *cs = &m->slots[i];
		int r;

		if (cs->state != CS_LOCKING)
			continue;
		if (stop) {
			unlock_chunk(m, cs->chunk, false);
			cs->state = CS_FREE;
			continue;
		}
		if (A_LOAD(&m->chunk[cs->chunk]) & CH_COUNT) {
			locking++;
			continue;
		}
		r = copy_begin(m, i);
		if (r < 0 && *ret == 0)
			*ret = r;
	}
	return locking;
}

/* A dirty pass begins: chunks dirty again since the last one are getting hot. */
static void count_hot(struct ubm_migration *m)
{
	uint64_t hot = 0;

	for (uint64_t c = 0; c < m->nr_chunks; c++) {
		if (!is_dirty(m, c))
			m->hot[c] = 0;
		else if (m->hot[c] >= HOT_PASSES)
			hot++;
	}
	A_STORE(&m->hot_count, hot);
}

/*
 * How long the copier sleeps with nothing on its ring (a drained chunk wakes
 * it sooner): to the end of the rest or of the speed limit's hold, else 1 ms
 * (waiting for guest writes on its locked chunks); at most 10 ms, so an abort,
 * a new speed or an idle guest are seen soon.
 */
static uint64_t idle_wait(const struct ubm_migration *m, const struct pass *p)
{
	uint64_t ns = mig_pace_rest_left(m, ubm_now_ns());

	if (p->speed_wait > ns)
		ns = p->speed_wait;
	return ns == 0 ? 1000000 : ns > 10000000 ? 10000000 : ns;
}

/*
 * Sleep ns, or less if a locked chunk's writes drain meanwhile (mig_chunks_put
 * bumps m->drained).  drained is m->drained as read before the copier last
 * looked at its locked chunks' counts: a drain since then returns at once.
 */
static void copier_wait(struct ubm_migration *m, uint32_t drained, uint64_t ns)
{
	struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u),
			       .tv_nsec = (long)(ns % 1000000000u) };

	syscall(SYS_futex, &m->drained, FUTEX_WAIT_PRIVATE, drained, &ts, NULL, 0);
}

UBM_EXPORT int ubm_mig_copy_pass(struct ubm_target *t, uint32_t pass, uint64_t *chunks)
{
	struct ubm_migration *m = mig_of(t);
	struct pass p = { .kind = pass, .origin = (double)ubm_now_ns() / 1e9 };
	uint64_t yield_since = 0;
	int ret = 0, r;

	*chunks = 0;
	ret = mig_check(m, true);
	if (ret)
		return ret;
	if (pass > UBM_PASS_FINAL)
		return ubm_fail(EINVAL, "unknown pass %u", pass);
	/* (an abort stays: every later pass of this migration stops at once) */
	if (pass == UBM_PASS_DIRTY)
		count_hot(m);
	m->pacer.phase = PACE_FREE;  /* (the time between passes is no burst) */
	for (;;) {
		/* read before the locked chunks' counts (start_locked): a chunk
		 * drained after that ends the wait below at once */
		uint32_t drained = A_LOAD(&m->drained);
		unsigned busy, locking;
		bool stop, held;

		if (t->dest.ops->reconnect && !A_LOAD(&m->error) &&
		    ubm_now_ns() - m->last_flush_ns > FLUSH_INTERVAL_NS) {
			m->last_flush_ns = ubm_now_ns();
			r = mig_flush_dest(m);
			if (r < 0)
				mig_set_error(m, r);
		}
		stop = ret < 0 || A_LOAD(&m->abort) || A_LOAD(&m->error);
		held = !stop && take_chunks(m, &p);
		A_STORE(&m->cursor, p.next);
		if (held != (yield_since != 0))
			yield_since = account_yield(m, yield_since);
		locking = start_locked(m, stop, &ret);
		busy = slots_busy(m);
		if (busy == 0 && (stop || p.next >= m->nr_chunks))
			break;
		if (busy == 0 || locking == busy) {
			/* nothing on the ring: sleep until a locked chunk's writes drain,
			 * a rest ends or the speed limit lets the next chunk go */
			copier_wait(m, drained, idle_wait(m, &p));
			continue;
		}
		io_uring_submit_and_wait(&m->copier.ring, 1);
		/* the core's dispatch: each copy step ends in copy_result, through
		 * mig_copier_backend_done (a failure lands in m->error) */
		ubm_queue_reap(&m->copier);
	}
	if (yield_since)
		account_yield(m, yield_since);
	A_ADD(&m->passes, 1);
	*chunks = p.copied;
	if (ret < 0 || A_LOAD(&m->error)) {
		int err = A_LOAD(&m->error) ? A_LOAD(&m->error) : ret;

		return ubm_fail(err, "copy failed: %s", strerror(-err));
	}
	if (A_LOAD(&m->abort))
		return ubm_fail(ECANCELED, "the pass was aborted");
	return 0;
}
