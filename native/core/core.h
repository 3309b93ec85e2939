/* SPDX-License-Identifier: MIT */
/*
 * The data plane's core: a guest request's machine on one io_uring (a queue),
 * and the target whose backend slots it goes to.  It knows no driver (ublk/
 * and sim/ feed it) and no migration (a router on the target stands between
 * the queues and the backends while one runs: migrate/route.c).
 */
#ifndef UBM_CORE_H
#define UBM_CORE_H

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <liburing.h>
#include <linux/ublk_cmd.h>

#include "ubm.h"

#define UBM_EXPORT __attribute__((visibility("default")))
#define UBM_MAX_DELTAS 8            /* snapshot generations */
#define UBM_MAX_BACKENDS (2 + UBM_MAX_DELTAS)  /* source, destination, deltas */
#define UBM_MAX_QUEUES 64
#define UBM_DEFAULT_WAIT_MS 60000   /* ubm_config.wait_ms unset */

#define ubm_likely(x) __builtin_expect(!!(x), 1)
#define ubm_unlikely(x) __builtin_expect(!!(x), 0)

/* CLOCK_MONOTONIC in ns: every deadline and latency of the data plane */
static inline uint64_t ubm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* core/error.c: thread-local error text behind ubm_last_error(); returns -err. */
int ubm_fail(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * CQE user_data: which io (tag) an operation belongs to, what it was, and
 * for backend I/O which backend slot.
 */
enum ubm_ud_kind {
	UD_CMD = 1,      /* FETCH / COMMIT_AND_FETCH on the ublk char device */
	UD_BACKEND = 2,  /* an operation a backend submitted for an io */
	UD_REG = 3,      /* UBLK_U_IO_REGISTER_IO_BUF (explicit zero copy) */
	UD_UNREG = 4,    /* UBLK_U_IO_UNREGISTER_IO_BUF */
	UD_WAKE = 5,     /* the queue's doorbell eventfd became readable */
	UD_IGNORE = 6,   /* a CQE nobody waits for (backends/delay.c's timeout) */
	UD_CONN = 7,     /* a backend's connection (not one io's): ops->conn_cqe */
	UD_TICK = 8,     /* the queue's timer while requests wait for a connection */
};

static inline uint64_t ubm_ud(unsigned tag, unsigned kind, unsigned slot)
{
	return (uint64_t)tag | (uint64_t)kind << 16 | (uint64_t)slot << 24;
}
static inline unsigned ubm_ud_tag(uint64_t ud) { return ud & 0xffff; }
static inline unsigned ubm_ud_kind(uint64_t ud) { return (ud >> 16) & 0xff; }
static inline unsigned ubm_ud_slot(uint64_t ud) { return (ud >> 24) & 0xff; }

/* One guest request as a backend sees it. */
struct ubm_req {
	uint8_t op;          /* UBLK_IO_OP_* */
	uint32_t flags;      /* UBLK_IO_F_* */
	uint64_t offset;     /* bytes */
	uint32_t len;        /* bytes */
	void *buf;           /* data in process memory (copy mode, sim) */
	int buf_index;       /* zero copy: fixed-buffer index holding the data; -1 if none */
	uint32_t buf_off;    /* zero copy: where in that buffer this request's data starts */
};

struct ubm_queue;
struct ubm_backend;

/*
 * A backend: where data lives.  Adding a backend is adding one file that
 * fills this table (like the kernel selftest server's ublk_tgt_ops).
 */
struct ubm_backend_ops {
	const char *name;
	/* open `path`; fill be->size; return 0 or -errno (with ubm_fail text) */
	int (*open)(struct ubm_backend *be, const char *path);
	/* queue the SQEs that carry out `req` for io `tag` on queue q, with
	 * user_data ubm_ud(tag, UD_BACKEND, slot); return how many CQEs will
	 * arrive for it (>= 1), or -errno */
	int (*queue_io)(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
			const struct ubm_req *req);
	/* one of those CQEs arrived: store the sub-operation's result in *res
	 * and return 0, or queue a follow-up operation (same user_data) and
	 * return 1 when the request is not done on this backend yet */
	int (*complete)(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
			const struct ubm_req *req, int cqe_res, int *res);
	void (*close)(struct ubm_backend *be);
	/* optional, for backends with per-ring state (connections): set up
	 * q->be_ctx[slot] before ring q first uses the backend, and drop it */
	int (*attach)(struct ubm_backend *be, struct ubm_queue *q, unsigned slot);
	void (*detach)(struct ubm_backend *be, struct ubm_queue *q);
	/* a UD_CONN CQE on ring q; a request it ends goes to q->backend_done() */
	void (*conn_cqe)(struct ubm_backend *be, struct ubm_queue *q,
			 const struct io_uring_cqe *cqe);
	/* the control thread, blocking: UBLK_IO_OP_READ len bytes at off into
	 * buf, or UBLK_IO_OP_FLUSH; 0 or -errno */
	int (*sync_io)(struct ubm_backend *be, int op, void *buf, uint32_t len, uint64_t off);
	/* connections: how many are lost, and dial those again (each ring
	 * takes its new one when it next queues I/O) */
	unsigned (*down)(struct ubm_backend *be);
	int (*reconnect)(struct ubm_backend *be);
	/* whether ring q's connection died (what failed a request on it, or
	 * will fail the next): the request can wait for reconnect() */
	bool (*ring_down)(struct ubm_backend *be, struct ubm_queue *q, unsigned slot);
};

struct ubm_backend {
	const struct ubm_backend_ops *ops;
	int fd;
	int file_index;         /* fixed-file slot in every ring (backend slot + 1), or -1:
				 * I/O names the plain fd (migrate/: ubm_fixed_migration_files) */
	uint64_t size;
	uint32_t max_io;        /* largest single transfer the backend takes (0: any) */
	uint32_t logical_bs;
	bool read_only, direct, is_blockdev;
	bool can_discard;       /* the backend can deallocate (punch holes / discard) */
	bool no_zero_range;     /* FALLOC_FL_ZERO_RANGE refused once: punch instead */
	uint32_t timeout_ms;    /* remote backends: the longest wait on the server (0: 30 s) */
	int via_fd;             /* files: > 0, open this descriptor's file again (the one the
				 * control plane checked), not whatever the path names now */
	void *priv;             /* the backend's own state */
};


/* The descriptor an SQE names for backend `be`, and the flag that goes with it. */
static inline int ubm_be_fd(const struct ubm_backend *be)
{
	return be->file_index >= 0 ? be->file_index : be->fd;
}

static inline void ubm_be_sqe_flags(const struct ubm_backend *be, struct io_uring_sqe *sqe)
{
	if (be->file_index >= 0)
		sqe->flags |= IOSQE_FIXED_FILE;
}


/* Backend slots of a target. */
enum { SLOT_SOURCE = 0, SLOT_DEST = 1, SLOT_DELTA0 = 2 };

/* Fixed-file slots, the same in every ring (queues, simulator, copier):
 * the ublk char device, then one per backend slot. */
#define FILE_UBLKC 0
#define FILE_OF_SLOT(slot) ((slot) + 1)
#define NR_FILES (1 + UBM_MAX_BACKENDS)

struct ubm_router;
struct ubm_io;

/*
 * A router stands between a target's queues and its backends while it is set
 * (a migration: migrate/route.c); without one a request goes to the primary
 * alone.  The calls come from the queue threads, on the request's ring.
 */
struct ubm_router_ops {
	/* fill io->slots and io->sreq[]: 0 to send it, 1 to park it (routed
	 * again on ACT_RETRY_PARKED), or -errno to fail it */
	int (*route)(struct ubm_router *r, struct ubm_queue *q, unsigned tag);
	/* backend `slot`'s part ended with res: whether res counts for the
	 * guest's answer (else it is the router's business alone) */
	bool (*part_done)(struct ubm_router *r, struct ubm_queue *q, unsigned tag, unsigned slot,
			  int res);
	/* every part ended: 1 to route it again (park it), else 0 */
	int (*io_done)(struct ubm_router *r, struct ubm_queue *q, unsigned tag);
};

struct ubm_router {
	const struct ubm_router_ops *ops;
};

/* The backends an io can go to, and the router between them while one is set. */
struct ubm_target {
	struct ubm_backend *be[UBM_MAX_BACKENDS];  /* by slot */
	struct ubm_backend source;
	struct ubm_backend dest;         /* opened by a migration; primary after cutover */
	int files[NR_FILES];             /* what every ring should have installed (ACT_FILES) */
	char *source_path;
	uint32_t max_io;                 /* largest request the target gets */
	int primary;                     /* slot serving I/O: SOURCE, DEST after cutover */
	uint64_t wait_ns;                /* the longest a guest request waits for a lost
					  * connection of the primary to come back (core/queue.c) */
	struct ubm_router *router;       /* set while a migration runs (atomic) */
	pthread_mutex_t router_lock;     /* against freeing it under stats/abort/speed */
	struct ubm_queue *queues;        /* the queues routing to this target */
	unsigned nr_queues;
};

/* Per-queue counters: written by the queue thread only, read by anyone. */
struct ubm_qstats {
	uint64_t reads, writes, flushes, discards, write_zeroes;
	uint64_t read_bytes, write_bytes, errors, inflight, fua_writes;
	uint64_t parked;         /* requests that waited for a chunk copy or a pause */
	uint64_t conn_waiting;   /* requests waiting now for a lost connection */
	uint64_t conn_waits;     /* requests that waited for one, in all */
	uint64_t conn_failed;    /* ... and failed, as it was not back in time */
} __attribute__((aligned(64)));

enum ubm_io_state {
	IO_IDLE = 0,       /* no command and no request (aborted, or sim free) */
	IO_FETCHING,       /* FETCH / COMMIT_AND_FETCH outstanding */
	IO_REG,            /* explicit zero copy: buffer being registered */
	IO_PARKED,         /* waiting for a chunk being copied, or a pause */
	IO_CONN_WAIT,      /* failed on a lost connection: waiting for a new one */
	IO_BACKEND,        /* backends working on the request */
	IO_UNREG,          /* explicit zero copy: buffer being unregistered */
};

struct ubm_io {
	struct ubm_req req;
	int result;              /* first error, or bytes done (primary backend) */
	uint16_t pending;        /* backend CQEs still to come */
	uint16_t slots;          /* backends the request went to (bit per slot) */
	uint8_t state;           /* enum ubm_io_state */
	bool plain;              /* routed without a router (counted in plain_inflight) */
	struct ubm_req sreq[UBM_MAX_BACKENDS];  /* what each of those backends does */
	uint8_t be_stage[UBM_MAX_BACKENDS];  /* backend-private progress */
	uint32_t be_bytes[UBM_MAX_BACKENDS];  /* bytes a backend has transferred so far */
	uint16_t next_parked;    /* parked list link */
	struct ubm_router *router;  /* routed by this router, which keeps its own state for
				     * the request by queue and tag (migrate/route.c) */
	uint64_t t_wait;         /* when it first failed on a lost connection (ns; 0: never) */
	void *buf;               /* copy mode: this tag's buffer */
};

/* Actions other threads ask of a queue thread, through its doorbell. */
enum {
	ACT_RETRY_PARKED = 1u << 0,  /* a chunk was unlocked / the pause ended */
	ACT_SYNC = 1u << 1,          /* acknowledge (the target changed) */
	ACT_STOP = 1u << 2,          /* leave the loop once nothing is in flight */
	ACT_FILES = 1u << 3,         /* install target->files[] beyond the source */
	ACT_RETRY_CONN = 1u << 4,    /* connections were dialled again: retry their waiters */
	ACT_GIVE_UP = 1u << 5,       /* the device is stopping: fail the waiters, wait no more */
};

#define NO_TAG 0xffff

struct ubm_queue {
	struct ubm_dev *dev;     /* the device's queue (ublk/), NULL in simulation: the
				  * caller drives the ring then */
	/* ublk: a UD_CMD CQE (FETCH / COMMIT_AND_FETCH completed) */
	void (*cmd_cqe)(struct ubm_queue *q, const struct io_uring_cqe *cqe);
	struct ubm_target *tgt;
	unsigned q_id, depth;
	int cpu;                 /* the queue thread runs on this CPU (-1: anywhere) */
	int path;                /* enum ubm_data_path */
	struct io_uring ring;
	bool ring_ok;
	bool single_issuer;      /* only this queue's thread may touch the ring */
	const struct ublksrv_io_desc *iods;  /* ublk: the request descriptors (mmap) */
	size_t iods_len;
	struct ubm_io *ios;
	unsigned cmds_inflight;  /* ublk commands outstanding */
	unsigned ios_inflight;   /* requests being handled */
	unsigned plain_inflight; /* ... of which routed without a migration (atomic reads) */
	bool stopping;
	int bell_fd;             /* doorbell eventfd, polled by the ring */
	uint32_t actions;        /* ACT_* asked for (atomic) */
	uint32_t acked;          /* ACT_SYNC generation acknowledged (atomic) */
	uint16_t parked_head;    /* requests waiting to be routed again */
	uint16_t wait_head;      /* requests waiting for a lost connection (IO_CONN_WAIT) */
	bool tick_armed;         /* the UD_TICK timer is pending */
	bool give_up;            /* ACT_GIVE_UP came: requests no longer wait for connections */
	struct __kernel_timespec tick;  /* the timer's interval */
	/* completion sink: ublk commits, the simulator records */
	void (*io_done)(struct ubm_queue *q, unsigned tag, int res);
	/* a backend operation of io `tag` ended with res, as if by its CQE
	 * (backends whose operations end on a connection's CQE call it) */
	void (*backend_done)(struct ubm_queue *q, unsigned tag, unsigned slot, int res);
	void *be_ctx[UBM_MAX_BACKENDS];  /* backend state for this ring (ops->attach) */
	void *sim;               /* simulator state */
	pthread_t thread;
	int init_err;
	struct ubm_qstats stats;
};

/* core/target.c */
/* an empty target: no backend open yet, the source in slot SOURCE serving;
 * a request waits up to wait_ms (0: UBM_DEFAULT_WAIT_MS) for a lost connection */
void ubm_target_init(struct ubm_target *t, uint32_t wait_ms);
/* close its backends (nothing in flight, no router; before its queues go:
 * a backend may hold per-queue state) */
void ubm_target_fini(struct ubm_target *t);
void ubm_target_ring_bells(struct ubm_target *t, uint32_t actions);
int ubm_target_sync(struct ubm_target *t);
int ubm_target_set_file(struct ubm_target *t, unsigned slot, int fd);
/* the primary's lost connections were dialled again: its waiting requests retry */
void ubm_target_conn_back(struct ubm_target *t);
/* the target's part of the stats: the primary's lost connections */
void ubm_target_stats(const struct ubm_target *t, struct ubm_stats *out);
/* Requests the target's queues have completed so far, failed ones included (their
 * counters, which other threads may read). */
uint64_t ubm_target_completed(const struct ubm_target *t);

/* core/queue.c */
int ubm_queue_ring_init(struct ubm_queue *q, unsigned entries, int ublkc_fd, bool sparse_bufs,
			bool single_issuer);
int ubm_queue_bell_arm(struct ubm_queue *q);
void ubm_queue_ring_bell(struct ubm_queue *q, uint32_t actions);
int ubm_queue_set_file(struct ubm_queue *q, unsigned index, int fd);
void ubm_queue_ring_exit(struct ubm_queue *q);
struct io_uring_sqe *ubm_queue_sqe(struct ubm_queue *q);
void ubm_queue_start_io(struct ubm_queue *q, unsigned tag);
void ubm_queue_backends_done(struct ubm_queue *q, unsigned tag);
void ubm_queue_handle_cqe(struct ubm_queue *q, const struct io_uring_cqe *cqe);
int ubm_queue_reap(struct ubm_queue *q);
/* fail the requests waiting for a lost connection, and let none wait from now on */
void ubm_queue_give_up(struct ubm_queue *q);
/* send the requests waiting for a lost connection to their backend again */
void ubm_queue_retry_waiting(struct ubm_queue *q);
void ubm_stats_add(struct ubm_stats *out, const struct ubm_qstats *s);

static inline void ubm_stat_inc(uint64_t *c, uint64_t v)
{
	__atomic_store_n(c, *c + v, __ATOMIC_RELAXED);
}

#endif
