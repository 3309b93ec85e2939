/* SPDX-License-Identifier: MIT */
/*
 * Backend: an export of an NBD server (qemu-nbd, nbdkit, ...), over TCP or a
 * unix socket: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH.
 *
 * Every ring that does I/O on the backend (each queue, the copier, a
 * simulator) has a connection of its own, opened by attach() before the ring
 * first uses it: the per-I/O path never blocks and takes no lock.  One more,
 * blocking, connection serves the control thread (verify, the cutover's
 * flush).  Several connections need the server's multi-conn flag: a flush on
 * one then covers the writes completed on all.
 *
 * On a connection, sends are serialised: one chain of linked sends is in
 * flight at a time, carrying every request queued since the last chain (the
 * 28-byte header and, for a write, the payload straight from the request's
 * buffer: the registered one in zero copy).  A chain split across
 * submissions could interleave with the next, so a chain never outgrows the
 * free SQ space.  One receive is armed while replies are due: a simple
 * reply's 16 bytes, then for a read the data, into the request's buffer.  A
 * reply completes its request through q->backend_done(), as a CQE would.
 *
 * A connection that fails (send or receive error, end of stream, a reply
 * that makes no sense, or no reply due within the timeout) is dead: every
 * request on it fails with the error and later ones fail at once, until
 * reconnect() has dialled a new one, which the ring takes when it next queues
 * I/O with nothing in flight.  On a destination before the cutover that is a
 * destination error (the chunk goes dirty; the migration reconnects or fails,
 * the source stays).  On the backend serving the device (a source, or a
 * destination after the cutover) the guest's requests wait for the new
 * connection instead (core/queue.c, ring_down()).
 *
 * Every wait on the server has a deadline (be->timeout_ms, 30 s unless set):
 * each armed receive carries a linked timeout, the dial and the handshake
 * run against one deadline (and take at most MAX_OPT_REPLIES replies), TCP
 * connections give up unacknowledged data after it (TCP_USER_TIMEOUT) and
 * probe idle peers (keepalive), and the control thread's requests share it.
 */
#ifndef UBM_NBD_H
#define UBM_NBD_H

#include "backends/backends.h"

#define NBD_PORT "10809"
#define NBDMAGIC 0x4e42444d41474943ull
#define IHAVEOPT 0x49484156454f5054ull
#define OPT_REPLY_MAGIC 0x3e889045565a9ull
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
enum { HS_FIXED_NEWSTYLE = 1, HS_NO_ZEROES = 2 };
enum { OPT_ABORT = 2, OPT_GO = 7 };
enum { REP_ACK = 1, REP_INFO = 3 };
#define REP_ERR (1u << 31)
enum {
	REP_ERR_UNSUP = REP_ERR | 1, REP_ERR_POLICY = REP_ERR | 2, REP_ERR_TLS_REQD = REP_ERR | 5,
	REP_ERR_UNKNOWN = REP_ERR | 6, REP_ERR_SHUTDOWN = REP_ERR | 7,
};
enum { INFO_EXPORT = 0, INFO_BLOCK_SIZE = 3 };
enum {
	TF_READ_ONLY = 1 << 1, TF_SEND_FLUSH = 1 << 2, TF_SEND_FUA = 1 << 3, TF_SEND_WRITE_ZEROES = 1 << 6, TF_CAN_MULTI_CONN = 1 << 8,
};
enum { CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2, CMD_FLUSH = 3, CMD_WRITE_ZEROES = 6 };
enum { CMD_FLAG_FUA = 1, CMD_FLAG_NO_HOLE = 2 };
#define MAX_PAYLOAD (32u << 20)  /* the protocol's advice, and qemu-nbd's limit */
#define DEFAULT_TIMEOUT_MS 30000 /* be->timeout_ms unset */
#define MAX_OPT_REPLIES 64       /* replies to NBD_OPT_GO before it is given up */
struct nbd_request {
	uint32_t magic;
	uint16_t flags, type;
	uint64_t cookie, offset;
	uint32_t length;
} __attribute__((packed));
struct nbd_reply {
	uint32_t magic, error;
	uint64_t cookie;
} __attribute__((packed));
/* be_stage values */
enum { STAGE_MAIN = 0, STAGE_SYNC = 1 };
/* per-tag state on a connection */
enum { NQ_IDLE = 0, NQ_QUEUED, NQ_SENT };
/* what a connection's CQE was (user_data bits 48..55) */
enum { W_SEND_HDR = 1, W_SEND_DATA = 2, W_REPLY = 3, W_DATA = 4, W_TIMEOUT = 5 };
struct nbd_conn {
	struct nbd_conn *next;
	struct ubm_queue *q;       /* the ring that owns it */
	unsigned slot;
	uint16_t serial;           /* tells its CQEs from a previous connection's */
	int fd;
	unsigned depth;
	struct nbd_request *hdr;   /* by tag: the header being sent */
	const struct ubm_req **req;  /* by tag */
	uint8_t *state;            /* by tag: NQ_* */
	uint16_t *sendq;           /* tags waiting for the next chain (ring buffer) */
	unsigned sq_head, sq_len;
	unsigned chain;            /* send CQEs still to come from the chain in flight */
	unsigned outstanding;      /* requests queued or sent, no reply yet */
	unsigned rx_tag;           /* W_DATA: the read being received */
	bool rx_armed;
	int dead;                  /* 0, or the -errno that killed it */
	int fresh_fd;              /* dialled by reconnect(), for the ring to take (atomic) */
	uint64_t seq;              /* cookies: tag | seq << 16, so a stale reply is refused */
	struct __kernel_timespec timeout;  /* the armed receive's deadline (linked timeout) */
	struct nbd_reply rep;
};
struct nbd_backend {
	char *uri, *host, *port, *socket, *export;
	uint16_t flags;
	uint64_t export_size;      /* as the first connection saw it: every later one must too */
	uint32_t max_payload;
	uint32_t timeout_ms;       /* every wait on the server: a reply, a handshake, a dial */
	uint64_t dial_deadline;    /* open(), then attach() of every ring: one deadline */
	pthread_mutex_t lock;      /* the sync connection (held while a request waits) */
	pthread_mutex_t list_lock; /* the list of connections (never held while waiting) */
	int sync_fd;
	uint64_t sync_cookie;
	struct nbd_conn *conns;
};

/* nbd_wire.c: the address, the dial and the handshake, blocking I/O with a deadline */
int nbd_parse_uri(struct nbd_backend *nb, const char *uri);
uint64_t nbd_deadline_after(const struct nbd_backend *nb);
int nbd_full_io(int fd, void *buf, size_t len, bool wr, uint64_t deadline);
int nbd_connect(struct ubm_backend *be, uint64_t deadline);
void nbd_free(struct nbd_backend *nb);

/* nbd.c: the connections (the ring takes a redialled one, with nothing in flight) */
void nbd_revive(struct nbd_conn *c);

/* nbd_io.c: the requests, on a ring's connection and on the control thread's */
int nbd_queue_io(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
		 const struct ubm_req *req);
int nbd_complete(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
		 const struct ubm_req *req, int cqe_res, int *res);
void nbd_conn_cqe(struct ubm_backend *be, struct ubm_queue *q, const struct io_uring_cqe *cqe);
int nbd_sync_io(struct ubm_backend *be, int op, void *buf, uint32_t len, uint64_t off);

#endif
