/* SPDX-License-Identifier: MIT */
/*
 * Backend: an export of an NBD server (the overview is in nbd.h).  The
 * connections, one per ring that does I/O on it and one for the control
 * thread, and the requests on them; the protocol's set-up is in nbd_wire.c.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <endian.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "backends/nbd.h"

static uint16_t next_serial;

static uint16_t next_serial;

static int nbd_open(struct ubm_backend *be, const char *uri)
{
	struct nbd_backend *nb = calloc(1, sizeof(*nb));
	int ret;

	if (!nb)
		return ubm_fail(ENOMEM, "out of memory");
	pthread_mutex_init(&nb->lock, NULL);
	pthread_mutex_init(&nb->list_lock, NULL);
	nb->timeout_ms = be->timeout_ms ? be->timeout_ms : DEFAULT_TIMEOUT_MS;
	nb->sync_fd = -1;
	be->priv = nb;
	be->size = 0;
	nb->uri = strdup(uri);
	ret = nb->uri ? nbd_parse_uri(nb, uri) : ubm_fail(ENOMEM, "out of memory");
	/* the migration's start dials a connection for every ring next: all by then */
	nb->dial_deadline = nbd_deadline_after(nb);
	if (ret == 0)
		ret = nbd_connect(be, nb->dial_deadline);
	if (ret < 0) {
		nbd_free(nb);
		be->priv = NULL;
		return ret;
	}
	nb->sync_fd = ret;
	be->fd = ret;
	be->file_index = -1;
	be->max_io = nb->max_payload;
	be->can_discard = true;  /* a discard is a WRITE_ZEROES that may deallocate */
	if ((nb->flags & TF_READ_ONLY) && !be->read_only) {
		be->ops->close(be);
		return ubm_fail(EROFS, "%s: the NBD export is read-only", uri);
	}
	if (!(nb->flags & TF_SEND_WRITE_ZEROES) && !be->read_only) {
		be->ops->close(be);
		return ubm_fail(EOPNOTSUPP, "%s: the NBD server does not offer WRITE_ZEROES", uri);
	}
	if (!(nb->flags & TF_CAN_MULTI_CONN)) {
		be->ops->close(be);
		return ubm_fail(EOPNOTSUPP, "%s: the NBD server does not offer multi-conn; ublkmig "
				"opens a connection per queue and two more (qemu-nbd: --shared=0)",
				uri);
	}
	return 0;
}

/* ---- the rings' connections --------------------------------------------------------- */

static uint64_t conn_ud(const struct nbd_conn *c, unsigned tag, unsigned what)
{
	return ubm_ud(tag, UD_CONN, c->slot) | (uint64_t)c->serial << 32 | (uint64_t)what << 48;
}

/*
 * Whether this kernel sends from and receives into registered buffers
 * (IORING_RECVSEND_FIXED_BUF on SEND and RECV): zero copy needs both, as the
 * request's data is only in its registered buffer.  0 or -errno.
 */
static int probe_fixed_send_recv(void)
{
	static int result = 1;
	struct io_uring ring;
	struct io_uring_cqe *cqe;
	char buf[8] = "ublkmig";
	struct iovec iov = { buf, sizeof(buf) };
	int sv[2], ret;

	if (result <= 0)
		return result;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -errno;
	ret = io_uring_queue_init(4, &ring, 0);
	if (ret == 0) {
		ret = io_uring_register_buffers(&ring, &iov, 1);
		for (int i = 0; ret == 0 && i < 2; i++) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);

			if (i == 0)
				io_uring_prep_send(sqe, sv[0], buf, sizeof(buf), MSG_WAITALL);
			else
				io_uring_prep_recv(sqe, sv[1], buf, sizeof(buf), MSG_WAITALL);
			sqe->ioprio |= IORING_RECVSEND_FIXED_BUF;
			sqe->buf_index = 0;
			io_uring_submit(&ring);
			ret = io_uring_wait_cqe(&ring, &cqe);
			if (ret == 0) {
				ret = cqe->res == (int)sizeof(buf) ? 0 : cqe->res < 0 ? cqe->res : -EIO;
				io_uring_cqe_seen(&ring, cqe);
			}
		}
		io_uring_queue_exit(&ring);
	}
	close(sv[0]);
	close(sv[1]);
	result = ret;
	return ret;
}

static int nbd_attach(struct ubm_backend *be, struct ubm_queue *q, unsigned slot)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_conn *c;
	int fd;

	if (q->path != UBM_PATH_COPY && (fd = probe_fixed_send_recv()) < 0)
		return ubm_fail(-fd, "%s: this kernel cannot send or receive a registered buffer "
				"on a socket (%s), which an NBD export needs with a zero-copy "
				"data path; serve the device with --data-path copy", nb->uri,
				strerror(-fd));
	c = calloc(1, sizeof(*c));
	if (!c)
		return ubm_fail(ENOMEM, "out of memory");
	c->depth = q->depth;
	c->hdr = calloc(c->depth, sizeof(*c->hdr));
	c->req = calloc(c->depth, sizeof(*c->req));
	c->state = calloc(c->depth, 1);
	c->sendq = calloc(c->depth, sizeof(*c->sendq));
	if (!c->hdr || !c->req || !c->state || !c->sendq) {
		fd = ubm_fail(ENOMEM, "out of memory");
		goto fail;
	}
	pthread_mutex_lock(&nb->lock);
	fd = nbd_connect(be, nb->dial_deadline);
	pthread_mutex_unlock(&nb->lock);
	if (fd < 0)
		goto fail;
	c->fd = fd;
	c->fresh_fd = -1;
	c->q = q;
	c->slot = slot;
	c->serial = __atomic_add_fetch(&next_serial, 1, __ATOMIC_RELAXED);
	c->timeout = (struct __kernel_timespec){
		.tv_sec = nb->timeout_ms / 1000, .tv_nsec = (nb->timeout_ms % 1000) * 1000000ll,
	};
	pthread_mutex_lock(&nb->list_lock);
	c->next = nb->conns;
	nb->conns = c;
	pthread_mutex_unlock(&nb->list_lock);
	__atomic_store_n(&q->be_ctx[slot], c, __ATOMIC_RELEASE);
	return 0;
fail:
	free(c->hdr);
	free(c->req);
	free(c->state);
	free(c->sendq);
	free(c);
	return fd;
}

static void conn_free(struct nbd_conn *c)
{
	if (c->q->be_ctx[c->slot] == c)
		__atomic_store_n(&c->q->be_ctx[c->slot], NULL, __ATOMIC_RELEASE);
	/* a receive still armed (none is, with nothing in flight) ends at once */
	shutdown(c->fd, SHUT_RDWR);
	close(c->fd);
	if (c->fresh_fd >= 0)
		close(c->fresh_fd);
	free(c->hdr);
	free(c->req);
	free(c->state);
	free(c->sendq);
	free(c);
}

/* The ring q stops using the backend (the copier's ring goes away). */
static void nbd_detach(struct ubm_backend *be, struct ubm_queue *q)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_conn **pc, *c;

	if (!nb)
		return;
	pthread_mutex_lock(&nb->list_lock);
	for (pc = &nb->conns; (c = *pc);) {
		if (c->q == q) {
			*pc = c->next;
			conn_free(c);
		} else {
			pc = &c->next;
		}
	}
	pthread_mutex_unlock(&nb->list_lock);
}

/* On the owning ring, with nothing in flight on it: take the connection
 * reconnect() dialled in place of a lost one. */
static void revive(struct nbd_conn *c)
{
	int fd = __atomic_exchange_n(&c->fresh_fd, -1, __ATOMIC_ACQ_REL);

	if (fd < 0)
		return;
	/* conn_dead() ended every request on the old one (or none was in
	 * flight); CQEs still to come from it carry the old serial */
	shutdown(c->fd, SHUT_RDWR);
	close(c->fd);
	c->fd = fd;
	c->serial = __atomic_add_fetch(&next_serial, 1, __ATOMIC_RELAXED);
	c->sq_head = c->sq_len = c->chain = c->outstanding = 0;
	c->rx_armed = false;
	__atomic_store_n(&c->dead, 0, __ATOMIC_RELEASE);
}

/* A connection lost without its ring noticing yet: the peer hung up (an idle
 * connection, with no receive armed, learns it only when it next sends). */
static bool hung_up(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLRDHUP };

	return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/* Lost, and no replacement dialled yet (any thread). */
static bool lost(const struct nbd_conn *c)
{
	return __atomic_load_n(&c->fresh_fd, __ATOMIC_ACQUIRE) < 0 &&
		(__atomic_load_n(&c->dead, __ATOMIC_ACQUIRE) || hung_up(c->fd));
}

static void request_done(struct nbd_conn *c, unsigned tag, int res)
{
	c->state[tag] = NQ_IDLE;
	c->outstanding--;
	c->q->backend_done(c->q, tag, c->slot, res);
}

static void arm_reply(struct nbd_conn *c);

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

static int nbd_queue_io(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
			const struct ubm_req *req)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_conn *c = q->be_ctx[slot];
	uint16_t flags = 0, type;

	if (ubm_unlikely(!c))
		return -ENOTCONN;
	if (ubm_unlikely(__atomic_load_n(&c->fresh_fd, __ATOMIC_RELAXED) >= 0) && !c->outstanding)
		revive(c);
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

static int nbd_complete(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
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

static void nbd_conn_cqe(struct ubm_backend *be, struct ubm_queue *q,
			 const struct io_uring_cqe *cqe)
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

static int nbd_sync_io(struct ubm_backend *be, int op, void *buf, uint32_t len, uint64_t off)
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

static unsigned nbd_down(struct ubm_backend *be)
{
	struct nbd_backend *nb = be->priv;
	unsigned n = 0;

	if (!nb)
		return 0;
	/* not nb->lock: a request on the control thread's connection holds it for
	 * up to the timeout, and stats must not wait that long */
	pthread_mutex_lock(&nb->list_lock);
	for (struct nbd_conn *c = nb->conns; c; c = c->next)
		n += lost(c);
	pthread_mutex_unlock(&nb->list_lock);
	/* the control thread's (reconnect() dials it too) */
	n += hung_up(__atomic_load_n(&nb->sync_fd, __ATOMIC_ACQUIRE));
	return n;
}

/*
 * Dial the lost connections again, and the control thread's own.  The list
 * changes only when a ring starts or stops using the backend (a migration's
 * start and end, a device's creation and end), never meanwhile (the control
 * plane makes those calls one at a time): the dials (which may take seconds)
 * hold no lock, so stats are not held up.
 */
static int nbd_reconnect(struct ubm_backend *be)
{
	struct nbd_backend *nb = be->priv;
	uint64_t deadline = nbd_deadline_after(nb);  /* for all of them */
	int fd;

	for (struct nbd_conn *c = nb->conns; c; c = c->next) {
		if (!lost(c))
			continue;
		fd = nbd_connect(be, deadline);
		if (fd < 0)
			return fd;
		__atomic_store_n(&c->fresh_fd, fd, __ATOMIC_RELEASE);
	}
	fd = nbd_connect(be, deadline);  /* the control thread's may be just as broken */
	if (fd < 0)
		return fd;
	pthread_mutex_lock(&nb->lock);
	close(nb->sync_fd);
	__atomic_store_n(&nb->sync_fd, fd, __ATOMIC_RELEASE);
	be->fd = fd;
	pthread_mutex_unlock(&nb->lock);
	return 0;
}

static bool nbd_ring_down(struct ubm_backend *be, struct ubm_queue *q, unsigned slot)
{
	const struct nbd_conn *c = q->be_ctx[slot];

	(void)be;
	return c && c->dead;
}

static void nbd_close(struct ubm_backend *be)
{
	struct nbd_backend *nb = be->priv;
	struct nbd_request h = { .magic = htobe32(REQUEST_MAGIC), .type = htobe16(CMD_DISC) };

	if (!nb)
		return;
	while (nb->conns) {
		struct nbd_conn *c = nb->conns;

		nb->conns = c->next;
		conn_free(c);
	}
	if (nb->sync_fd >= 0) {
		/* a polite goodbye; the server may close without one too */
		nbd_full_io(nb->sync_fd, &h, sizeof(h), true, ubm_now_ns() + 1000000000ull);
		close(nb->sync_fd);
	}
	nbd_free(nb);
	be->priv = NULL;
	be->fd = -1;
}

const struct ubm_backend_ops ubm_nbd_backend_ops = {
	.name = "nbd",
	.open = nbd_open,
	.queue_io = nbd_queue_io,
	.complete = nbd_complete,
	.close = nbd_close,
	.attach = nbd_attach,
	.detach = nbd_detach,
	.conn_cqe = nbd_conn_cqe,
	.sync_io = nbd_sync_io,
	.down = nbd_down,
	.reconnect = nbd_reconnect,
	.ring_down = nbd_ring_down,
};
