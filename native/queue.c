/* SPDX-License-Identifier: MIT */
/*
 * Request handling shared by a ublk queue and the simulator: route a
 * request to its backends, gather their completions, hand the result to the
 * queue's completion sink.  This is the per-I/O path: no allocation, no
 * locks, no system calls beyond the ring's.
 */
#include <string.h>

#include "internal.h"

int ubm_queue_ring_init(struct ubm_queue *q, unsigned entries, const int *files, unsigned nr_files,
			bool sparse_bufs, bool single_issuer)
{
	struct io_uring_params p;
	int ret;

	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN;
	if (single_issuer)
		p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	p.cq_entries = entries * 2;
	ret = io_uring_queue_init_params(entries, &q->ring, &p);
	if (ret < 0)
		return ubm_fail(ret, "io_uring setup failed: %s", strerror(-ret));
	q->ring_ok = true;
	ret = io_uring_register_files(&q->ring, files, nr_files);
	if (ret < 0)
		return ubm_fail(ret, "io_uring file registration failed: %s", strerror(-ret));
	if (sparse_bufs) {
		ret = io_uring_register_buffers_sparse(&q->ring, q->depth);
		if (ret < 0)
			return ubm_fail(ret, "io_uring sparse buffer table failed: %s",
					strerror(-ret));
	}
	io_uring_register_ring_fd(&q->ring);
	return 0;
}

void ubm_queue_ring_exit(struct ubm_queue *q)
{
	if (q->ring_ok)
		io_uring_queue_exit(&q->ring);
	q->ring_ok = false;
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

static void finish_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	count_request(q, &io->req, io->result);
	q->ios_inflight--;
	__atomic_store_n(&q->stats.inflight, q->ios_inflight, __ATOMIC_RELAXED);
	q->io_done(q, tag, io->result);
}

static void add_result(struct ubm_io *io, int res)
{
	if (res < 0 && io->result >= 0)
		io->result = res;
}

/*
 * The routing hook: which backends a request goes to.  Without a migration
 * everything goes to the source.  Mirroring, dirty tracking and snapshots
 * hook in here.
 */
static void route_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];
	struct ubm_backend *be = &q->tgt->source;
	int n;

	io->state = IO_BACKEND;
	io->pending = 0;
	io->result = (int)io->req.len;
	if (ubm_unlikely(be->read_only && io->req.op != UBLK_IO_OP_READ &&
			 io->req.op != UBLK_IO_OP_FLUSH)) {
		io->result = -EROFS;
	} else {
		n = be->ops->queue_io(be, q, tag, 0, &io->req);
		if (n < 0)
			io->result = n;
		else
			io->pending += n;
	}
	if (io->pending == 0)
		ubm_queue_backends_done(q, tag);
}

/* Start handling the request now in q->ios[tag].req. */
void ubm_queue_start_io(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	q->ios_inflight++;
	__atomic_store_n(&q->stats.inflight, q->ios_inflight, __ATOMIC_RELAXED);
	if (q->path == UBM_PATH_ZC && io->req.buf_index >= 0) {
		/* explicit zero copy: register the request's pages first */
		struct io_uring_sqe *sqe = ubm_queue_sqe(q);
		struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;

		io_uring_prep_read(sqe, 0, NULL, 0, 0);
		sqe->opcode = IORING_OP_URING_CMD;
		sqe->flags |= IOSQE_FIXED_FILE;
		sqe->cmd_op = UBLK_U_IO_REGISTER_IO_BUF;
		cmd->q_id = q->q_id;
		cmd->tag = tag;
		cmd->addr = io->req.buf_index;
		io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_REG, 0));
		io->state = IO_REG;
		return;
	}
	route_io(q, tag);
}

void ubm_queue_backends_done(struct ubm_queue *q, unsigned tag)
{
	struct ubm_io *io = &q->ios[tag];

	if (q->path == UBM_PATH_ZC && io->req.buf_index >= 0) {
		struct io_uring_sqe *sqe = ubm_queue_sqe(q);
		struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;

		io_uring_prep_read(sqe, 0, NULL, 0, 0);
		sqe->opcode = IORING_OP_URING_CMD;
		sqe->flags |= IOSQE_FIXED_FILE;
		sqe->cmd_op = UBLK_U_IO_UNREGISTER_IO_BUF;
		cmd->q_id = q->q_id;
		cmd->tag = tag;
		cmd->addr = io->req.buf_index;
		io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_UNREG, 0));
		io->state = IO_UNREG;
		return;
	}
	finish_io(q, tag);
}

static void backend_cqe(struct ubm_queue *q, unsigned tag, unsigned slot, int cqe_res)
{
	struct ubm_io *io = &q->ios[tag];
	struct ubm_backend *be = &q->tgt->source;
	int res = 0;

	(void)slot;
	if (be->ops->complete(be, q, tag, slot, &io->req, cqe_res, &res))
		return;  /* a follow-up operation is on its way */
	add_result(io, res);
	if (--io->pending == 0)
		ubm_queue_backends_done(q, tag);
}

void ubm_queue_handle_cqe(struct ubm_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned tag = ubm_ud_tag(cqe->user_data);
	struct ubm_io *io = &q->ios[tag];

	switch (ubm_ud_kind(cqe->user_data)) {
	case UD_BACKEND:
		backend_cqe(q, tag, ubm_ud_slot(cqe->user_data), cqe->res);
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
		if (cqe->res < 0)
			add_result(io, cqe->res);
		finish_io(q, tag);
		break;
	}
}

/* Process every CQE ready now; returns how many. */
int ubm_queue_reap(struct ubm_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;

	io_uring_for_each_cqe(&q->ring, head, cqe) {
		if (q->dev && ubm_ud_kind(cqe->user_data) == UD_CMD)
			ubm_dev_cmd_cqe(q, cqe);
		else if (q->dev && ubm_ud_kind(cqe->user_data) == UD_WAKE)
			q->stopping = true;
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
}
