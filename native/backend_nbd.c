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
 * reply completes its request through q->be_done(), as a CQE would.
 *
 * A connection that fails (send or receive error, end of stream, a reply
 * that makes no sense, or no reply due within the timeout) is dead: every
 * request on it fails with the error and later ones fail at once, until
 * reconnect() has dialled a new one, which the ring takes when it next queues
 * I/O with nothing in flight.  On a destination before the cutover that is a
 * destination error (the chunk goes dirty; the migration reconnects or fails,
 * the source stays).  On the backend serving the device (a source, or a
 * destination after the cutover) the guest's requests wait for the new
 * connection instead (queue.c, ring_down()).
 *
 * Every wait on the server has a deadline (be->timeout_ms, 30 s unless set):
 * each armed receive carries a linked timeout, the dial and the handshake
 * run against one deadline (and take at most MAX_OPT_REPLIES replies), TCP
 * connections give up unacknowledged data after it (TCP_USER_TIMEOUT) and
 * probe idle peers (keepalive), and the control thread's requests share it.
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

#include "internal.h"

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

static uint16_t next_serial;

/* ---- the address ------------------------------------------------------------ */

static int hexval(int c)
{
	return isdigit(c) ? c - '0' : isxdigit(c) ? (tolower(c) - 'a' + 10) : -1;
}

/* A copy of s[0..n) with %XX decoded, or NULL (bad escape, NUL, no memory). */
static char *decode(const char *s, size_t n)
{
	char *out = malloc(n + 1), *o = out;

	if (!out)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		int c = (unsigned char)s[i];

		if (c == '%') {
			if (i + 2 >= n || hexval(s[i + 1]) < 0 || hexval(s[i + 2]) < 0)
				goto bad;
			c = hexval(s[i + 1]) << 4 | hexval(s[i + 2]);
			i += 2;
			if (c == 0)
				goto bad;
		}
		*o++ = (char)c;
	}
	*o = 0;
	return out;
bad:
	free(out);
	return NULL;
}

static int bad_uri(const char *uri, const char *why)
{
	return ubm_fail(EINVAL, "%s: not an NBD URI (%s); expected nbd://HOST[:PORT]/EXPORT or "
			"nbd+unix:///EXPORT?socket=PATH", uri, why);
}

static int parse_uri(struct nbd_backend *nb, const char *uri)
{
	const char *p, *slash, *q;

	if (!strncmp(uri, "nbd://", 6)) {
		const char *host = uri + 6, *hend, *port = NULL;

		slash = strchr(host, '/');
		if (!slash)
			slash = host + strlen(host);
		if (strchr(host, '?'))
			return bad_uri(uri, "a TCP address takes no query");
		if (*host == '[') {  /* [IPv6] */
			hend = memchr(host, ']', (size_t)(slash - host));
			if (!hend)
				return bad_uri(uri, "no ] after the IPv6 address");
			nb->host = strndup(host + 1, (size_t)(hend - host - 1));
			p = hend + 1;
		} else {
			hend = memchr(host, ':', (size_t)(slash - host));
			if (!hend)
				hend = slash;
			nb->host = strndup(host, (size_t)(hend - host));
			p = hend;
		}
		if (p < slash) {
			if (*p != ':' || p + 1 == slash)
				return bad_uri(uri, "bad port");
			port = p + 1;
			for (q = port; q < slash; q++)
				if (!isdigit((unsigned char)*q))
					return bad_uri(uri, "bad port");
			nb->port = strndup(port, (size_t)(slash - port));
		} else {
			nb->port = strdup(NBD_PORT);
		}
		if (!nb->host || !*nb->host)
			return bad_uri(uri, "no host");
		nb->export = decode(*slash ? slash + 1 : slash, *slash ? strlen(slash + 1) : 0);
	} else if (!strncmp(uri, "nbd+unix://", 11)) {
		const char *path = uri + 11, *query;

		if (*path != '/')
			return bad_uri(uri, "a unix socket URI has no host: nbd+unix:///EXPORT");
		query = strchr(path, '?');
		if (!query || strncmp(query + 1, "socket=", 7) || strchr(query + 1, '&'))
			return bad_uri(uri, "the query must be ?socket=PATH");
		nb->export = decode(path + 1, (size_t)(query - path - 1));
		nb->socket = decode(query + 8, strlen(query + 8));
		if (!nb->socket || !*nb->socket)
			return bad_uri(uri, "no socket path");
		if (strlen(nb->socket) >= sizeof(((struct sockaddr_un *)0)->sun_path))
			return ubm_fail(ENAMETOOLONG, "%s: the socket path is too long", uri);
	} else if (!strncmp(uri, "nbds", 4)) {
		return ubm_fail(EPROTONOSUPPORT, "%s: NBD over TLS is not supported", uri);
	} else {
		return bad_uri(uri, "unknown scheme");
	}
	if (!nb->export)
		return bad_uri(uri, "bad %-escape in the export name");
	if (strlen(nb->export) > 4096)
		return bad_uri(uri, "the export name is longer than 4096 bytes");
	return 0;
}

/* ---- the handshake (blocking) --------------------------------------------------- */

static uint64_t deadline_after(const struct nbd_backend *nb)
{
	return ubm_now_ns() + (uint64_t)nb->timeout_ms * 1000000ull;
}

/* Wait until fd is ready for `events`, or the deadline passes; 0 or -errno. */
static int wait_fd(int fd, short events, uint64_t deadline)
{
	struct pollfd p = { .fd = fd, .events = events };

	for (;;) {
		uint64_t now = ubm_now_ns();
		int r;

		if (now >= deadline)
			return -ETIMEDOUT;
		r = poll(&p, 1, (int)((deadline - now + 999999) / 1000000));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r > 0)
			return 0;
	}
}

/* Send or receive len bytes by the deadline (the whole transfer, not each call). */
static int full_io(int fd, void *buf, size_t len, bool wr, uint64_t deadline)
{
	for (size_t done = 0; done < len;) {
		ssize_t n;
		int ret = wait_fd(fd, wr ? POLLOUT : POLLIN, deadline);

		if (ret < 0)
			return ret;
		n = wr ? send(fd, (char *)buf + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT)
		       : recv(fd, (char *)buf + done, len - done, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		done += (size_t)n;
	}
	return 0;
}

/* connect() by the deadline; 0 or -errno */
static int connect_fd(int fd, const struct sockaddr *sa, socklen_t len, uint64_t deadline)
{
	int flags = fcntl(fd, F_GETFL), err = 0, ret;
	socklen_t n = sizeof(err);

	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		return -errno;
	ret = connect(fd, sa, len) == 0 ? 0 : -errno;
	if (ret == -EINPROGRESS || ret == -EINTR) {
		ret = wait_fd(fd, POLLOUT, deadline);
		if (ret == 0)
			ret = getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0 ? -errno : -err;
	}
	if (ret == 0 && fcntl(fd, F_SETFL, flags) < 0)
		ret = -errno;
	return ret;
}

/* A TCP connection whose peer vanishes (a partition, a dead host) fails within the timeout
 * rather than never: unacknowledged data gives up after it, and an idle connection is
 * probed (the replies' own deadline covers a peer that acknowledges but never answers). */
static void tcp_deadlines(int fd, uint32_t timeout_ms)
{
	int one = 1, idle = (int)(timeout_ms / 3000) ? (int)(timeout_ms / 3000) : 1, cnt = 3;
	unsigned user = timeout_ms;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user, sizeof(user));
}

static int dial(struct nbd_backend *nb, uint64_t deadline)
{
	int fd, err = 0;

	if (nb->socket) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };

		strcpy(sa.sun_path, nb->socket);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return ubm_fail(errno, "%s: socket: %s", nb->uri, strerror(errno));
		err = -connect_fd(fd, (struct sockaddr *)&sa, sizeof(sa), deadline);
		if (err == 0)
			return fd;
		close(fd);
		return ubm_fail(err, "%s: cannot connect to %s: %s", nb->uri, nb->socket,
				strerror(err));
	}
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *ai, *a;
	int gai = getaddrinfo(nb->host, nb->port, &hints, &ai);

	if (gai)
		return ubm_fail(EHOSTUNREACH, "%s: cannot resolve %s: %s", nb->uri, nb->host,
				gai_strerror(gai));
	fd = -1;
	for (a = ai; a; a = a->ai_next) {
		fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
		if (fd < 0) {
			err = errno;
			continue;
		}
		err = -connect_fd(fd, a->ai_addr, a->ai_addrlen, deadline);
		if (err == 0)
			break;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	if (fd < 0)
		return ubm_fail(err, "%s: cannot connect to %s port %s: %s", nb->uri, nb->host,
				nb->port, strerror(err));
	tcp_deadlines(fd, nb->timeout_ms);
	return fd;
}

/* Fixed newstyle handshake with NBD_OPT_GO; fills *size and *flags. */
/* Control characters of a server's text (an error message) as '?': it reaches a terminal. */
static void printable(char *text)
{
	for (unsigned char *p = (unsigned char *)text; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			*p = '?';
}

static int handshake_failed(const struct nbd_backend *nb, int ret)
{
	return ubm_fail(-ret, "%s: the NBD handshake failed: %s", nb->uri,
			ret == -ETIMEDOUT ? "no answer in time" : strerror(-ret));
}

static int handshake(struct nbd_backend *nb, int fd, uint64_t *size, uint16_t *flags,
		     uint32_t *max_payload, uint64_t deadline)
{
	struct {
		uint64_t magic, opt;
		uint16_t flags;
	} __attribute__((packed)) hello;
	uint32_t client, namelen = (uint32_t)strlen(nb->export);
	struct {
		uint64_t magic;
		uint32_t opt, len, namelen;
	} __attribute__((packed)) go = {
		htobe64(IHAVEOPT), htobe32(OPT_GO), htobe32(4 + namelen + 2), htobe32(namelen),
	};
	uint16_t no_infos = 0;
	bool have_export = false;
	unsigned replies = 0;
	int ret;

	ret = full_io(fd, &hello, sizeof(hello), false, deadline);
	if (ret < 0)
		return ubm_fail(-ret, "%s: no NBD greeting from the server: %s", nb->uri,
				ret == -ETIMEDOUT ? "no answer in time" : strerror(-ret));
	if (be64toh(hello.magic) != NBDMAGIC)
		return ubm_fail(EPROTO, "%s: the server does not speak NBD", nb->uri);
	if (be64toh(hello.opt) != IHAVEOPT)
		return ubm_fail(EPROTO, "%s: an oldstyle NBD server; only newstyle servers are "
				"supported", nb->uri);
	if (!(be16toh(hello.flags) & HS_FIXED_NEWSTYLE))
		return ubm_fail(EPROTO, "%s: the NBD server does not offer fixed newstyle "
				"negotiation", nb->uri);
	client = htobe32(HS_FIXED_NEWSTYLE | (be16toh(hello.flags) & HS_NO_ZEROES));
	if ((ret = full_io(fd, &client, 4, true, deadline)) < 0 ||
	    (ret = full_io(fd, &go, sizeof(go), true, deadline)) < 0 ||
	    (ret = full_io(fd, nb->export, namelen, true, deadline)) < 0 ||
	    (ret = full_io(fd, &no_infos, 2, true, deadline)) < 0)
		return handshake_failed(nb, ret);
	*max_payload = MAX_PAYLOAD;
	for (;;) {
		struct {
			uint64_t magic;
			uint32_t opt, type, len;
		} __attribute__((packed)) rep;
		char data[1024];
		uint32_t type, len;

		if (++replies > MAX_OPT_REPLIES)
			return ubm_fail(EPROTO, "%s: the NBD server sent more than %d replies to one "
					"option", nb->uri, MAX_OPT_REPLIES);
		ret = full_io(fd, &rep, sizeof(rep), false, deadline);
		if (ret < 0)
			return handshake_failed(nb, ret);
		type = be32toh(rep.type);
		len = be32toh(rep.len);
		if (be64toh(rep.magic) != OPT_REPLY_MAGIC || be32toh(rep.opt) != OPT_GO)
			return ubm_fail(EPROTO, "%s: a malformed reply in the NBD handshake", nb->uri);
		memset(data, 0, sizeof(data));
		for (uint32_t got = 0; got < len;) {
			uint32_t n = len - got < sizeof(data) ? len - got : (uint32_t)sizeof(data);

			/* keep the first 1 KiB (all we read), skip the rest */
			ret = full_io(fd, got ? (char[1024]){0} : data, n, false, deadline);
			if (ret < 0)
				return handshake_failed(nb, ret);
			got += n;
		}
		data[sizeof(data) - 1] = 0;
		printable(data);
		if (type == REP_ACK)
			break;
		if (type == REP_INFO && len >= 2) {
			uint16_t info = be16toh(*(uint16_t *)data);

			if (info == INFO_EXPORT && len >= 12) {
				uint64_t s;
				uint16_t f;

				memcpy(&s, data + 2, 8);
				memcpy(&f, data + 10, 2);
				*size = be64toh(s);
				*flags = be16toh(f);
				have_export = true;
			} else if (info == INFO_BLOCK_SIZE && len >= 14) {
				uint32_t mx;

				memcpy(&mx, data + 10, 4);
				if (be32toh(mx) && be32toh(mx) < *max_payload)
					*max_payload = be32toh(mx);
			}
			continue;
		}
		if (type & REP_ERR) {
			const char *msg = len ? data : "";
			const char *sep = len ? ": " : "";

			switch (type) {
			case REP_ERR_UNKNOWN:
				return ubm_fail(ENOENT, "%s: the NBD server has no export named '%s'%s%s",
						nb->uri, nb->export, sep, msg);
			case REP_ERR_POLICY:
				return ubm_fail(EACCES, "%s: the NBD server refused the export%s%s",
						nb->uri, sep, msg);
			case REP_ERR_TLS_REQD:
				return ubm_fail(EPROTONOSUPPORT, "%s: the NBD server requires TLS, which "
						"is not supported", nb->uri);
			case REP_ERR_UNSUP:
				return ubm_fail(EPROTONOSUPPORT, "%s: the NBD server is too old (no "
						"NBD_OPT_GO)", nb->uri);
			case REP_ERR_SHUTDOWN:
				return ubm_fail(ESHUTDOWN, "%s: the NBD server is shutting down",
						nb->uri);
			default:
				return ubm_fail(EPROTO, "%s: the NBD server refused the export (error "
						"%u)%s%s", nb->uri, type & ~REP_ERR, sep, msg);
			}
		}
		/* any other reply type: ignore, as the protocol says */
	}
	if (!have_export)
		return ubm_fail(EPROTO, "%s: the NBD server did not describe the export", nb->uri);
	return 0;
}

/* A new connection, past the handshake, by the deadline; checks it matches the first one's
 * export. */
static int nbd_connect(struct ubm_backend *be, uint64_t deadline)
{
	struct nbd_backend *nb = be->priv;
	uint64_t size = 0;
	uint16_t flags = 0;
	uint32_t max_payload;
	int fd = dial(nb, deadline), ret;

	if (fd < 0)
		return fd;
	ret = handshake(nb, fd, &size, &flags, &max_payload, deadline);
	if (ret < 0) {
		close(fd);
		return ret;
	}
	if (nb->export_size && (size != nb->export_size || flags != nb->flags)) {
		/* also on a reconnect: a server restarted on another export is refused */
		close(fd);
		return ubm_fail(EPROTO, "%s: a new connection to the NBD server saw a different "
				"export (%llu bytes, flags 0x%x; was %llu bytes, flags 0x%x)", nb->uri,
				(unsigned long long)size, flags, (unsigned long long)nb->export_size,
				nb->flags);
	}
	if (!nb->export_size)
		be->size = size;  /* (a recovered device then serves as much of it as it has) */
	nb->export_size = size;
	nb->flags = flags;
	nb->max_payload = max_payload;
	return fd;
}

static void nbd_free(struct nbd_backend *nb)
{
	free(nb->uri);
	free(nb->host);
	free(nb->port);
	free(nb->socket);
	free(nb->export);
	pthread_mutex_destroy(&nb->lock);
	pthread_mutex_destroy(&nb->list_lock);
	free(nb);
}

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
	ret = nb->uri ? parse_uri(nb, uri) : ubm_fail(ENOMEM, "out of memory");
	/* the migration's start dials a connection for every ring next: all by then */
	nb->dial_deadline = deadline_after(nb);
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
	c->q->be_done(c->q, tag, c->slot, res);
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
	deadline = deadline_after(nb);
	h.cookie = htobe64(++nb->sync_cookie);
	ret = full_io(nb->sync_fd, &h, sizeof(h), true, deadline);
	if (ret == 0)
		ret = full_io(nb->sync_fd, &r, sizeof(r), false, deadline);
	if (ret == 0 && (be32toh(r.magic) != SIMPLE_REPLY_MAGIC || r.cookie != h.cookie))
		ret = -EPROTO;
	if (ret == 0 && r.error)
		ret = reply_errno(be32toh(r.error));
	else if (ret == 0 && op == UBLK_IO_OP_READ)
		ret = full_io(nb->sync_fd, buf, len, false, deadline);
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
	uint64_t deadline = deadline_after(nb);  /* for all of them */
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
		full_io(nb->sync_fd, &h, sizeof(h), true, ubm_now_ns() + 1000000000ull);
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

bool ubm_is_nbd_uri(const char *path)
{
	return !strncmp(path, "nbd://", 6) || !strncmp(path, "nbd+unix://", 11) ||
		!strncmp(path, "nbds://", 7) || !strncmp(path, "nbds+unix://", 12);
}
