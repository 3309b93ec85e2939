/* SPDX-License-Identifier: MIT */
/*
 * Backend: an export of an NBD server (the overview is in nbd.h).  The
 * connections: the first one (open), one per ring that does I/O on it
 * (attach, detach), noticing a lost one and dialling it again (down,
 * reconnect, the ring's revive), the goodbye (close); and the ops table.
 * The protocol's set-up is in nbd_wire.c, the requests on the connections in
 * nbd_io.c (the per-I/O path, apart from the connections' lifecycle).
 */
#include <endian.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "backends/nbd.h"

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

/* ---- lost connections, dialled again ------------------------------------------------- */

/* On the owning ring, with nothing in flight on it: take the connection
 * reconnect() dialled in place of a lost one. */
void nbd_revive(struct nbd_conn *c)
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
