/* SPDX-License-Identifier: MIT */
/*
 * Request handling shared by a ublk queue and the simulator: route a
 * request to its backends (through the target's router while one is set),
 * gather their completions, hand the result to the queue's completion sink.
 * This is the per-I/O path: this file allocates nothing, takes no lock and
 * makes no system call beyond the ring's.  A router may (snapshot mode's copy
 * on write reads and writes a chunk on the queue thread: migrate/snapshot.c).
 *
 * A request that failed on a lost connection of the backend serving the
 * device (NBD: the source, or the destination after a cutover) is not failed:
 * it waits (IO_CONN_WAIT) until ubm_reconnect() has dialled the connection
 * again, then goes to the backend once more, as the dead server's requests go
 * to a new one after a ublk recovery.  Each waits at most t->wait_ns from its
 * first failure; a timer (UD_TICK) ends those that waited too long even if
 * nobody reconnects.  Sending a write again is safe: the guest has no answer
 * for it, so it has no other write to those sectors in flight that the old
 * copy could overtake.
 */
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"

static void backend_cqe(struct ubm_queue *q, unsigned tag, unsigned slot, int cqe_res);

int ubm_queue_ring_init(struct ubm_queue *q, unsigned entries, int ublkc_fd, bool sparse_bufs,
			bool single_issuer)
{
	int files[NR_FILES];
	struct io_uring_params p;
	int ret;

	/* -1 leaves a slot empty: migrations fill them */
	for (unsigned i = 0; i < NR_FILES; i++)
		files[i] = -1;
	files[FILE_UBLKC] = ublkc_fd;
	files[FILE_OF_SLOT(SLOT_SOURCE)] = q->tgt->source.fd;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN;
	if (single_issuer)
		p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	p.cq_entries = entries * 2;
	q->single_issuer = single_issuer;
	q->parked_head = NO_TAG;
	q->wait_head = NO_TAG;
	if (!q->backend_done)
		q->backend_done = backend_cqe;
	ret = io_uring_queue_init_params(entries, &q->ring, &p);
	if (ret < 0)
		return ubm_fail(ret, "io_uring setup failed: %s", strerror(-ret));
	q->ring_ok = true;
	ret = io_uring_register_files(&q->ring, files, NR_FILES);
	if (ret < 0)
		return ubm_fail(ret, "io_uring file registration failed: %s", strerror(-ret));
	if (sparse_bufs) {
		ret = io_uring_register_buffers_sparse(&q->ring, q->depth);
		if (ret < 0)
			return ubm_fail(ret, "io_uring sparse buffer table failed: %s",
					strerror(-ret));
	}
	/* a registered ring fd is private to the registering thread: only for
	 * rings one thread owns */
	if (single_issuer)
		io_uring_register_ring_fd(&q->ring);
	q->bell_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (q->bell_fd < 0)
		return ubm_fail(errno, "eventfd: %s", strerror(errno));
	return ubm_queue_bell_arm(q);
}

void ubm_queue_ring_exit(struct ubm_queue *q)
{
	if (q->ring_ok)
		io_uring_queue_exit(&q->ring);
	q->ring_ok = false;
	if (q->bell_fd >= 0)
		close(q->bell_fd);
	q->bell_fd = -1;
}

struct io_uring_sqe *ubm_queue_sqe(struct ubm_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (ubm_unlikely(!sqe)) {
		io_uring_submit(&q->ring);
		sqe = io_uring_get_sqe(&q->ring);
	}
	return sqe;
}

/* ---- doorbell: other threads asking this queue's thread to act --------- */

int ubm_queue_bell_arm(struct ubm_queue *q)
{
	struct io_uring_sqe *sqe = ubm_queue_sqe(q);

	if (!sqe)
		return ubm_fail(EBUSY, "no SQE for the doorbell");
	io_uring_prep_poll_add(sqe, q->bell_fd, POLLIN);
	io_uring_sqe_set_data64(sqe, ubm_ud(0, UD_WAKE, 0));
	return 0;
}

void ubm_queue_ring_bell(struct ubm_queue *q, uint32_t actions)
{
	uint64_t one = 1;

	__atomic_fetch_or(&q->actions, actions, __ATOMIC_SEQ_CST);
	if (write(q->bell_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		return;  /* EAGAIN: the counter is saturated, the bell rings anyway */
}

/* Install (or with fd -1, empty) a fixed-file slot in this queue's ring. */
int ubm_queue_set_file(struct ubm_queue *q, unsigned index, int fd)
{
	int ret = io_uring_register_files_update(&q->ring, index, &fd, 1);

	return ret < 0 ? ubm_fail(ret, "io_uring file update failed: %s", strerror(-ret)) : 0;
}

static void route_io(struct ubm_queue *q, unsigned tag);

/* Backend `slot`'s part of the request ended with res (bytes or -errno): the
 * first error is the guest's answer, unless the router keeps it (a
 * destination's before the cutover: migrate/route.c). */
static void part_result(struct ubm_queue *q, unsigned tag, unsigned slot, int res)
{
	struct ubm_io *io = &q->ios[tag];

	if (ubm_unlikely(io->router != NULL) &&
	    !io->router->ops->part_done(io->router, q, tag, slot, res))
		return;
	if (res < 0 && io->result >= 0)
		io->result = res;
}

static void doorbell(struct ubm_queue *q)
{
	uint64_t count;
	uint32_t act;
	uint16_t tag, next;

	if (read(q->bell_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
		return;  /* cannot happen with an eventfd; no re-arm */
	act = __atomic_exchange_n(&q->actions, 0, __ATOMIC_SEQ_CST);
	if (act & ACT_STOP)
		q->stopping = true;
	if (act & ACT_RETRY_PARKED) {
		tag = q->parked_head;
		q->parked_head = NO_TAG;
		for (; tag != NO_TAG; tag = next) {
			next = q->ios[tag].next_parked;
			route_io(q, tag);
		}
	}
	if (act & ACT_GIVE_UP)
		ubm_queue_give_up(q);
	if (act & ACT_RETRY_CONN)
		ubm_queue_retry_waiting(q);
	if (act & ACT_FILES) {
		int files[NR_FILES];
		unsigned first = FILE_OF_SLOT(SLOT_DEST);

		for (unsigned i = first; i < NR_FILES; i++)
			files[i] = __atomic_load_n(&q->tgt->files[i], __ATOMIC_ACQUIRE);
		io_uring_register_files_update(&q->ring, first, files + first, NR_FILES - first);
	}
	if (act & ACT_SYNC)
		__atomic_fetch_add(&q->acked, 1, __ATOMIC_RELEASE);
	if (!q->stopping)
		ubm_queue_bell_arm(q);
}

/* ---- requests --------------------------------------------------------------- */

static void count_request(struct ubm_queue *q, const struct ubm_req *req, int res)
{
	struct ubm_qstats *s = &q->stats;

	if (res < 0) {
		ubm_stat_inc(&s->errors, 1);
		return;
	}
	switch (req->op) {
	case UBLK_IO_OP_READ:
		ubm_stat_inc(&s->reads, 1);
		ubm_stat_inc(&s->read_bytes, req->len);
		break;
	case UBLK_IO_OP_WRITE:
		ubm_stat_inc(&s->writes, 1);
		ubm_stat_inc(&s->write_bytes, req->len);
		if (req->flags & UBLK_IO_F_FUA)
			ubm_stat_inc(&s->fua_writes, 1);
		break;
	case UBLK_IO_OP_FLUSH:
		ubm_stat_inc(&s->flushes, 1);
		break;
	case UBLK_IO_OP_DISCARD:
		ubm_stat_inc(&s->discards, 1);
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		ubm_stat_inc(&s->write_zeroes, 1);
		break;
	}
}

/* A request routed without a migration is done there (a migration starting
 * waits for those, ubm_mig_start). */
static void unroute_plain(struct ubm_queue *q, struct ubm_io *io)
{
	if (!io->plain)
		return;
	io->plain = false;
	__atomic_store_n(&q->plain_inflight, q->plain_inflight - 1, __ATOMIC_RELEASE);
}

static void finish_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	unroute_plain(q, io);
	count_request(q, &io->req, io->result);
	q->ios_inflight--;
	__atomic_store_n(&q->stats.inflight, q->ios_inflight, __ATOMIC_RELAXED);
	q->io_done(q, tag, io->result);
}

/* Hold a request until the doorbell says ACT_RETRY_PARKED: routed again then. */
static void park_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	io->state = IO_PARKED;
	io->next_parked = q->parked_head;
	q->parked_head = (uint16_t)tag;
	ubm_stat_inc(&q->stats.parked, 1);
}

static void route_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	struct ubm_target *t = q->tgt;
	struct ubm_router *r = __atomic_load_n(&t->router, __ATOMIC_ACQUIRE);
	int n;

	io->router = NULL;
	io->pending = 0;
	io->result = (int)io->req.len;
	if (ubm_likely(r == NULL)) {
		io->slots = (uint16_t)(1u << t->primary);
		io->sreq[t->primary] = io->req;
		/* a migration starting now waits for these (ubm_mig_start) */
		io->plain = true;
		__atomic_store_n(&q->plain_inflight, q->plain_inflight + 1, __ATOMIC_RELEASE);
	} else {
		/* the router fills io->slots and io->sreq[] */
		n = r->ops->route(r, q, tag);
		if (n > 0) {
			park_io(q, tag);
			return;
		}
		io->router = r;
		if (n < 0) {
			io->result = n;
			io->slots = 0;
		}
	}
	io->state = IO_BACKEND;
	if (ubm_unlikely(t->be[t->primary]->read_only && io->req.op != UBLK_IO_OP_READ &&
			 io->req.op != UBLK_IO_OP_FLUSH)) {
		io->result = -EROFS;
		io->slots = 0;
	}
	for (unsigned slot = 0; io->slots >> slot; slot++) {
		struct ubm_backend *be = t->be[slot];

		if (!(io->slots & (1u << slot)))
			continue;
		n = be->ops->queue_io(be, q, tag, slot, &io->sreq[slot]);
		if (n >= 0)
			io->pending += n;
		else
			part_result(q, tag, slot, n);
	}
	if (io->pending == 0)
		ubm_queue_backends_done(q, tag);
}

/* Explicit zero copy: (un)register the request's pages at its buffer index. */
static void prep_buf_cmd(struct ubm_queue *q, unsigned tag, unsigned cmd_op, unsigned kind)
{
	struct io_uring_sqe *sqe = ubm_queue_sqe(q);
	struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;

	io_uring_prep_read(sqe, FILE_UBLKC, NULL, 0, 0);  /* clears the fields */
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags |= IOSQE_FIXED_FILE;
	sqe->cmd_op = cmd_op;
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->addr = q->ios[tag].req.buf_index;
	io_uring_sqe_set_data64(sqe, ubm_ud(tag, kind, 0));
}

/* Start handling the request now in q->ios[tag].req. */
void ubm_queue_start_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	io->t_wait = 0;
	q->ios_inflight++;
	__atomic_store_n(&q->stats.inflight, q->ios_inflight, __ATOMIC_RELAXED);
	if (q->path == UBM_PATH_ZC && io->req.buf_index >= 0) {
		/* explicit zero copy: register the request's pages first */
		prep_buf_cmd(q, tag, UBLK_U_IO_REGISTER_IO_BUF, UD_REG);
		io->state = IO_REG;
		return;
	}
	route_io(q, tag);
}

/* ---- waiting for a lost connection ------------------------------------------ */

#define TICK_NS 250000000ull  /* the waiters' timer: how late a deadline may be noticed */

static void arm_tick(struct ubm_queue *q)
{
	struct io_uring_sqe *sqe;

	if (q->tick_armed || !(sqe = ubm_queue_sqe(q)))
		return;
	q->tick = (struct __kernel_timespec){ .tv_nsec = (long long)TICK_NS };
	io_uring_prep_timeout(sqe, &q->tick, 0, 0);
	io_uring_sqe_set_data64(sqe, ubm_ud(0, UD_TICK, 0));
	q->tick_armed = true;
}

/*
 * The request failed (its routing is undone: chunk references, counts).
 * If the primary's connection on this ring is what failed it, and it has
 * not waited its time yet, it waits for a new one: true.
 */
static bool wait_for_conn(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	struct ubm_target *t = q->tgt;
	unsigned slot = (unsigned)t->primary;
	struct ubm_backend *be = t->be[slot];
	uint64_t now;

	if (q->give_up || !(io->slots & (1u << slot)) || !be->ops->ring_down ||
	    !be->ops->ring_down(be, q, slot))
		return false;
	now = ubm_now_ns();
	if (!io->t_wait) {
		io->t_wait = now;
		ubm_stat_inc(&q->stats.conn_waits, 1);
	} else if (now - io->t_wait >= t->wait_ns) {
		ubm_stat_inc(&q->stats.conn_failed, 1);
		return false;
	}
	unroute_plain(q, io);
	io->router = NULL;  /* (routed afresh when it goes again) */
	io->state = IO_CONN_WAIT;
	io->next_parked = q->wait_head;
	q->wait_head = (uint16_t)tag;
	ubm_stat_inc(&q->stats.conn_waiting, 1);
	arm_tick(q);
	return true;
}

/* Every waiter goes to the backend again: it takes a connection dialled
 * meanwhile, or fails at once and waits on (or, past its time, fails). */
void ubm_queue_retry_waiting(struct ubm_queue *q)
{
	uint16_t tag = q->wait_head, next;

	q->wait_head = NO_TAG;
	for (; tag != NO_TAG; tag = next) {
		next = q->ios[tag].next_parked;
		__atomic_store_n(&q->stats.conn_waiting, q->stats.conn_waiting - 1,
				 __ATOMIC_RELAXED);
		route_io(q, tag);
	}
}

void ubm_queue_give_up(struct ubm_queue *q)
{
	q->give_up = true;
	ubm_queue_retry_waiting(q);  /* each fails now, unless its connection is back */
}

static void complete_io(struct ubm_queue *q, unsigned tag);

void ubm_queue_backends_done(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	if (io->router && io->router->ops->io_done(io->router, q, tag)) {
		park_io(q, tag);
		return;
	}
	if (ubm_unlikely(io->result < 0) && wait_for_conn(q, tag))
		return;
	complete_io(q, tag);
}

/* The request is done with its backends: answer it. */
static void complete_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	if (q->path == UBM_PATH_ZC && io->req.buf_index >= 0) {
		prep_buf_cmd(q, tag, UBLK_U_IO_UNREGISTER_IO_BUF, UD_UNREG);
		io->state = IO_UNREG;
		return;
	}
	finish_io(q, tag);
}

static void backend_cqe(struct ubm_queue *q, unsigned tag, unsigned slot, int cqe_res)
{
	struct ubm_io *io = &q->ios[tag];
	struct ubm_backend *be = q->tgt->be[slot];
	int res = 0;

	if (be->ops->complete(be, q, tag, slot, &io->sreq[slot], cqe_res, &res))
		return;  /* a follow-up operation is on its way */
	part_result(q, tag, slot, res);
	if (--io->pending == 0)
		ubm_queue_backends_done(q, tag);
}

void ubm_queue_handle_cqe(struct ubm_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned tag = ubm_ud_tag(cqe->user_data);
	struct ubm_io *io = &q->ios[tag];

	switch (ubm_ud_kind(cqe->user_data)) {
	case UD_BACKEND:  /* (backend_cqe, or the copier's: migrate/copier.c) */
		q->backend_done(q, tag, ubm_ud_slot(cqe->user_data), cqe->res);
		break;
	case UD_REG:
		if (cqe->res < 0) {
			io->result = cqe->res;
			finish_io(q, tag);  /* nothing registered: nothing to undo */
		} else {
			route_io(q, tag);
		}
		break;
	case UD_UNREG:
		if (cqe->res < 0 && io->result >= 0)
			io->result = cqe->res;
		finish_io(q, tag);
		break;
	case UD_WAKE:
		doorbell(q);
		break;
	case UD_TICK:
		q->tick_armed = false;
		if (q->wait_head != NO_TAG) {
			ubm_queue_retry_waiting(q);
			if (q->wait_head != NO_TAG)
				arm_tick(q);
		}
		break;
	case UD_CONN: {
		struct ubm_backend *be = q->tgt->be[ubm_ud_slot(cqe->user_data)];

		if (be && be->ops->conn_cqe)  /* else: its backend is gone */
			be->ops->conn_cqe(be, q, cqe);
		break;
	}
	}
}

/* Process every CQE ready now; returns how many. */
int ubm_queue_reap(struct ubm_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	io_uring_for_each_cqe(&q->ring, head, cqe) {
		if (q->cmd_cqe && ubm_ud_kind(cqe->user_data) == UD_CMD)
			q->cmd_cqe(q, cqe);
		else
			ubm_queue_handle_cqe(q, cqe);
		n++;
	}
	io_uring_cq_advance(&q->ring, n);
	return (int)n;
}

void ubm_stats_add(struct ubm_stats *out, const struct ubm_qstats *s)
{
	out->reads += __atomic_load_n(&s->reads, __ATOMIC_RELAXED);
	out->writes += __atomic_load_n(&s->writes, __ATOMIC_RELAXED);
	out->flushes += __atomic_load_n(&s->flushes, __ATOMIC_RELAXED);
	out->discards += __atomic_load_n(&s->discards, __ATOMIC_RELAXED);
	out->write_zeroes += __atomic_load_n(&s->write_zeroes, __ATOMIC_RELAXED);
	out->read_bytes += __atomic_load_n(&s->read_bytes, __ATOMIC_RELAXED);
	out->write_bytes += __atomic_load_n(&s->write_bytes, __ATOMIC_RELAXED);
	out->errors += __atomic_load_n(&s->errors, __ATOMIC_RELAXED);
	out->inflight += __atomic_load_n(&s->inflight, __ATOMIC_RELAXED);
	out->fua_writes += __atomic_load_n(&s->fua_writes, __ATOMIC_RELAXED);
	out->parked += __atomic_load_n(&s->parked, __ATOMIC_RELAXED);
	out->conn_waiting += __atomic_load_n(&s->conn_waiting, __ATOMIC_RELAXED);
	out->conn_waits += __atomic_load_n(&s->conn_waits, __ATOMIC_RELAXED);
	out->conn_failed += __atomic_load_n(&s->conn_failed, __ATOMIC_RELAXED);
}
