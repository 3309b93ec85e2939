/* SPDX-License-Identifier: MIT */
/*
 * The NBD protocol up to transmission: the export's address (a URI), dialling
 * it (TCP or a unix socket) and the fixed newstyle handshake (NBD_OPT_GO), all
 * against one deadline; blocking I/O with a deadline.  The connections are
 * in nbd.c, the requests on them in nbd_io.c.
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

int nbd_parse_uri(struct nbd_backend *nb, const char *uri)
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

uint64_t nbd_deadline_after(const struct nbd_backend *nb)
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
int nbd_full_io(int fd, void *buf, size_t len, bool wr, uint64_t deadline)
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

	ret = nbd_full_io(fd, &hello, sizeof(hello), false, deadline);
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
	if ((ret = nbd_full_io(fd, &client, 4, true, deadline)) < 0 ||
	    (ret = nbd_full_io(fd, &go, sizeof(go), true, deadline)) < 0 ||
	    (ret = nbd_full_io(fd, nb->export, namelen, true, deadline)) < 0 ||
	    (ret = nbd_full_io(fd, &no_infos, 2, true, deadline)) < 0)
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
		ret = nbd_full_io(fd, &rep, sizeof(rep), false, deadline);
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
			ret = nbd_full_io(fd, got ? (char[1024]){0} : data, n, false, deadline);
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
int nbd_connect(struct ubm_backend *be, uint64_t deadline)
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

void nbd_free(struct nbd_backend *nb)
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

bool ubm_is_nbd_uri(const char *path)
{
	return !strncmp(path, "nbd://", 6) || !strncmp(path, "nbd+unix://", 11) ||
		!strncmp(path, "nbds://", 7) || !strncmp(path, "nbds+unix://", 12);
}
