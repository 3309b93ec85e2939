/* SPDX-License-Identifier: MIT */
/*
 * Backend: an export of an NBD server (the overview is in nbd.h).  The
 * requests on its connections, the per-I/O path: on a ring's connection a
 * request's header, the chains of linked sends, the armed receive with its
 * linked timeout, the replies and the requests they complete; on the control
 * thread's, blocking requests.  The connections themselves (open, attach,
 * lost and redialled, close) are in nbd.c, the protocol's set-up in
 * nbd_wire.c.
 */
#include <endian.h>
#include <sys/socket.h>

#include "backends/nbd.h"

/* ---- a ring's connection -------------------------------------------------------------- */

static uint64_t conn_ud(const struct nbd_conn *c, unsigned tag, unsigned what)
{
	return ubm_ud(tag, UD_CONN, c->slot) | (uint64_t)c->serial << 32 | (uint64_t)what << 48;
}

static void request_done(struct nbd_conn *c, unsigned tag, int res)
{
	c->state[tag] = NQ_IDLE;
	c->outstanding--;
	c->q->backend_done(c->q, tag, c->slot, res);
}

/* The connection is unusable: fail everything on it. */
static void conn_dead(struct nbd_conn *c, int err)
{
	if (c->dead)
		return;
	__atomic_store_n(&c->dead, err < 0 ? err : -EIO, __ATOMIC_RELEASE);
	c->sq_len = 0;
	shutdown(c->fd, SHUT_RDWR);  /* an armed receive ends */
	for (unsigned tag = 0; tag < c->depth; tag++)
		if (c->state[tag] != NQ_IDLE)
			request_done(c, tag, c->dead);
}

/* Send every queued request, as one chain of linked sends. */
static void start_chain(struct nbd_conn *c)
{
	struct io_uring *ring = &c->q->ring;
	struct io_uring_sqe *sqe = NULL;
	unsigned space;

	if (io_uring_sq_space_left(ring) < 4)
		io_uring_submit(ring);
	space = io_uring_sq_space_left(ring);
	while (c->sq_len && space >= 2) {
		unsigned tag = c->sendq[c->sq_head];
		const struct ubm_req *req = c->req[tag];
		bool payload = be16toh(c->hdr[tag].type) == CMD_WRITE;

		c->sq_head = (c->sq_head + 1) % c->depth;
		c->sq_len--;
		c->state[tag] = NQ_SENT;
		if (sqe)
			sqe->flags |= IOSQE_IO_LINK;
		sqe = io_uring_get_sqe(ring);
		io_uring_prep_send(sqe, c->fd, &c->hdr[tag], sizeof(c->hdr[tag]),
				   MSG_WAITALL | MSG_MORE);
		io_uring_sqe_set_data64(sqe, conn_ud(c, tag, W_SEND_HDR));
		c->chain++;
		space--;
		if (payload) {
			sqe->flags |= IOSQE_IO_LINK;
			sqe = io_uring_get_sqe(ring);
			if (req->buf_index >= 0) {
				io_uring_prep_send(sqe, c->fd, (void *)(uintptr_t)req->buf_off, req->len,
						   MSG_WAITALL | MSG_MORE);
				sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
				sqe->buf_index = (uint16_t)req->buf_index;
			} else {
				io_uring_prep_send(sqe, c->fd, req->buf, req->len,
						   MSG_WAITALL | MSG_MORE);
			}
			io_uring_sqe_set_data64(sqe, conn_ud(c, tag, W_SEND_DATA));
			c->chain++;
			space--;
		}
	}
	if (sqe)
		sqe->msg_flags &= ~MSG_MORE;  /* the chain's end: push it out */
}

/*
 * Two SQEs for a receive and its linked timeout: the server has
 * nb->timeout_ms to send what is due (with requests outstanding), or the
 * connection is dead (-ETIMEDOUT): a server that takes requests and never
 * answers, or a partition TCP does not notice, ends the requests on it as a
 * lost connection would.  NULL if the ring has no room.
 */
static struct io_uring_sqe *prep_timed_recv(struct nbd_conn *c)
{
	struct io_uring *ring = &c->q->ring;

	if (io_uring_sq_space_left(ring) < 2)
		io_uring_submit(ring);
	if (io_uring_sq_space_left(ring) < 2)
		return NULL;
	return io_uring_get_sqe(ring);  /* (the caller links it, after its prep) */
}

static void link_timeout(struct nbd_conn *c)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->q->ring);

	io_uring_prep_link_timeout(sqe, &c->timeout, 0);
	io_uring_sqe_set_data64(sqe, conn_ud(c, 0, W_TIMEOUT));
}

static void arm_reply(struct nbd_conn *c)
{
	struct io_uring_sqe *sqe;

	if (c->rx_armed || c->dead || !c->outstanding)
		return;
	sqe = prep_timed_recv(c);
	if (!sqe) {
		conn_dead(c, -EBUSY);
		return;
	}
	io_uring_prep_recv(sqe, c->fd, &c->rep, sizeof(c->rep), MSG_WAITALL);
	sqe->flags |= IOSQE_IO_LINK;  /* (prep clears the flags) */
	io_uring_sqe_set_data64(sqe, conn_ud(c, 0, W_REPLY));
	link_timeout(c);
	c->rx_armed = true;
}

/* A receive's result as the connection's error: its linked timeout cancelled it. */
static int recv_error(int res, int eof)
{
	return res == -ECANCELED ? -ETIMEDOUT : res < 0 ? res : eof;
}

static int submit(struct nbd_conn *c, unsigned tag, const struct ubm_req *req, uint16_t type,
		  uint16_t flags)
{
	struct nbd_request *h = &c->hdr[tag];
	bool data = type != CMD_FLUSH;

	if (c->dead)
		return c->dead;
	h->magic = htobe32(REQUEST_MAGIC);
	h->flags = htobe16(flags);
	h->type = htobe16(type);
	h->cookie = htobe64(tag | ++c->seq << 16);
	h->offset = htobe64(data ? req->offset : 0);
	h->length = htobe32(data ? req->len : 0);
	c->req[tag] = req;
	c->state[tag] = NQ_QUEUED;
	c->sendq[(c->sq_head + c->sq_len) % c->depth] = (uint16_t)tag;
	c->sq_len++;
	c->outstanding++;
	if (!c->chain)
		start_chain(c);
	arm_reply(c);
	return 1;
}

/* Nothing to do on the server: complete through a NOP. */
static int nothing(struct ubm_queue *q, unsigned tag, unsigned slot)
{
	struct io_uring_sqe *sqe = ubm_queue_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_BACKEND, slot));
	return 1;
}

int nbd_queue_io(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
		 const struct ubm_req *req)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_conn *c = q->be_ctx[slot];
	uint16_t flags = 0, type;

	if (ubm_unlikely(!c))
		return -ENOTCONN;
	if (ubm_unlikely(__atomic_load_n(&c->fresh_fd, __ATOMIC_RELAXED) >= 0) && !c->outstanding)
		nbd_revive(c);
	if (ubm_unlikely(c->dead))
		return c->dead;
	q->ios[tag].be_stage[slot] = STAGE_MAIN;
	switch (req->op) {
	case UBLK_IO_OP_READ:
		type = CMD_READ;
		break;
	case UBLK_IO_OP_WRITE:
		type = CMD_WRITE;
		if ((req->flags & UBLK_IO_F_FUA) && (nb->flags & TF_SEND_FUA))
			flags |= CMD_FLAG_FUA;
		break;
	case UBLK_IO_OP_FLUSH:
		if (!(nb->flags & TF_SEND_FLUSH))
			return nothing(q, tag, slot);  /* the server writes through */
		type = CMD_FLUSH;
		break;
	case UBLK_IO_OP_DISCARD:
		/* not TRIM: after it the server may return anything (qemu-nbd
		 * ignores it by default), and a migration must keep the
		 * destination equal to the source, which reads zeroes there.
		 * WRITE_ZEROES without NO_HOLE lets the server deallocate. */
		type = CMD_WRITE_ZEROES;
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		type = CMD_WRITE_ZEROES;
		if (req->flags & UBLK_IO_F_NOUNMAP)
			flags |= CMD_FLAG_NO_HOLE;
		break;
	default:
		return -EOPNOTSUPP;
	}
	return submit(c, tag, req, type, flags);
}

int nbd_complete(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
		 const struct ubm_req *req, int cqe_res, int *res)
{
	struct nbd_backend *nb = be->priv;
	uint8_t *stage = &q->ios[tag].be_stage[slot];
	struct nbd_conn *c = q->be_ctx[slot];

	if (cqe_res >= 0 && *stage == STAGE_MAIN && req->op == UBLK_IO_OP_WRITE &&
	    (req->flags & UBLK_IO_F_FUA) && !(nb->flags & TF_SEND_FUA) &&
	    (nb->flags & TF_SEND_FLUSH) && c) {
		/* FUA without the server's FUA: a flush after the write */
		*stage = STAGE_SYNC;
		cqe_res = submit(c, tag, req, CMD_FLUSH, 0);
		if (cqe_res > 0)
			return 1;
	}
	*res = cqe_res < 0 ? cqe_res : (int)req->len;
	return 0;
}

/* NBD errors are errno values (the protocol's list matches Linux's numbers). */
static int reply_errno(uint32_t error)
{
	switch (error) {
	case EPERM: case EIO: case ENOMEM: case EINVAL: case ENOSPC: case EOVERFLOW:
	case EOPNOTSUPP: case ESHUTDOWN:
		return -(int)error;
	default:
		return -EIO;
	}
}

void nbd_conn_cqe(struct ubm_backend *be, struct ubm_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned slot = ubm_ud_slot(cqe->user_data), tag = ubm_ud_tag(cqe->user_data);
	unsigned what = (cqe->user_data >> 48) & 0xff;
	struct nbd_conn *c = q->be_ctx[slot];
	const struct ubm_req *req;

	(void)be;
	if (!c || c->serial != (uint16_t)(cqe->user_data >> 32))
		return;  /* a connection closed since */
	switch (what) {
	case W_TIMEOUT:  /* its receive says what happened */
		break;
	case W_SEND_HDR:
	case W_SEND_DATA: {
		int want = what == W_SEND_HDR ? (int)sizeof(struct nbd_request) : (int)c->req[tag]->len;

		c->chain--;
		if (cqe->res != want)
			conn_dead(c, cqe->res < 0 ? cqe->res : -EIO);
		else if (!c->chain && c->sq_len && !c->dead)
			start_chain(c);
		break;
	}
	case W_REPLY:
		c->rx_armed = false;
		if (c->dead)
			break;
		if (cqe->res != (int)sizeof(c->rep)) {
			conn_dead(c, recv_error(cqe->res, -ECONNRESET));
			break;
		}
		tag = (unsigned)(be64toh(c->rep.cookie) & 0xffff);
		/* the whole cookie: a stale or duplicate reply must not end the
		 * tag's next request */
		if (be32toh(c->rep.magic) != SIMPLE_REPLY_MAGIC || tag >= c->depth ||
		    c->state[tag] != NQ_SENT || c->rep.cookie != c->hdr[tag].cookie) {
			conn_dead(c, -EPROTO);
			break;
		}
		req = c->req[tag];
		if (be16toh(c->hdr[tag].type) == CMD_READ && c->rep.error == 0) {
			struct io_uring_sqe *sqe = prep_timed_recv(c);

			if (!sqe) {
				conn_dead(c, -EBUSY);
				break;
			}
			if (req->buf_index >= 0) {
				io_uring_prep_recv(sqe, c->fd, (void *)(uintptr_t)req->buf_off, req->len,
						   MSG_WAITALL);
				sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
				sqe->buf_index = (uint16_t)req->buf_index;
			} else {
				io_uring_prep_recv(sqe, c->fd, req->buf, req->len, MSG_WAITALL);
			}
			sqe->flags |= IOSQE_IO_LINK;
			io_uring_sqe_set_data64(sqe, conn_ud(c, tag, W_DATA));
			link_timeout(c);
			c->rx_armed = true;
			c->rx_tag = tag;
			break;
		}
		request_done(c, tag, c->rep.error ? reply_errno(be32toh(c->rep.error)) : 0);
		arm_reply(c);
		break;
	case W_DATA:
		c->rx_armed = false;
		if (c->dead)
			break;
		if (cqe->res != (int)c->req[c->rx_tag]->len) {
			conn_dead(c, recv_error(cqe->res, -ECONNRESET));
			break;
		}
		request_done(c, c->rx_tag, cqe->res);
		arm_reply(c);
		break;
	}
}

/* ---- the control thread's connection ------------------------------------------------- */

int nbd_sync_io(struct ubm_backend *be, int op, void *buf, uint32_t len, uint64_t off)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_request h = { .magic = htobe32(REQUEST_MAGIC) };
	struct nbd_reply r;
	uint64_t deadline;
	int ret;

	if (op == UBLK_IO_OP_READ) {
		h.type = htobe16(CMD_READ);
		h.offset = htobe64(off);
		h.length = htobe32(len);
	} else if (op == UBLK_IO_OP_FLUSH) {
		if (!(nb->flags & TF_SEND_FLUSH))
			return 0;
		h.type = htobe16(CMD_FLUSH);
	} else {
		return -EOPNOTSUPP;
	}
	pthread_mutex_lock(&nb->lock);
	deadline = nbd_deadline_after(nb);
	h.cookie = htobe64(++nb->sync_cookie);
	ret = nbd_full_io(nb->sync_fd, &h, sizeof(h), true, deadline);
	if (ret == 0)
		ret = nbd_full_io(nb->sync_fd, &r, sizeof(r), false, deadline);
	if (ret == 0 && (be32toh(r.magic) != SIMPLE_REPLY_MAGIC || r.cookie != h.cookie))
		ret = -EPROTO;
	if (ret == 0 && r.error)
		ret = reply_errno(be32toh(r.error));
	else if (ret == 0 && op == UBLK_IO_OP_READ)
		ret = nbd_full_io(nb->sync_fd, buf, len, false, deadline);
	if (ret == -ETIMEDOUT || ret == -EPROTO) {
		/* the stream's place is lost (a late reply would come next):
		 * the connection is of no further use; reconnect() dials it */
		shutdown(nb->sync_fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&nb->lock);
	return ret;
}

