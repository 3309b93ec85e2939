/* SPDX-License-Identifier: MIT */
/*
 * Live migration: the routing of guest requests while a target's data moves
 * to a destination, and the copier.
 *
 * The disk is cut into chunks.  Each chunk has one atomic state word:
 *
 *   COPIED   the destination holds the chunk (unless it is also dirty)
 *   LOCKED   the copier is copying it: guest writes to it wait (park)
 *   WAITERS  a parked request waits for the lock (or COW) to go
 *   COW      snapshot: a queue is copying the chunk into the active delta
 *   count    guest writes in flight on the chunk
 *
 * A guest write takes a reference on every chunk it touches, unless one is
 * locked (then it parks until the copier unlocks).  The copier locks a chunk
 * and waits until its count drops to zero before it reads the source: a
 * write that arrived before the lock is on the source by then.  A write that
 * touches only chunks not copied yet goes to the source alone, in every mode
 * but snapshot: the copier copies them after it.  Any other write, in mirror
 * mode, goes to both sides (route.c says why, also where one of its chunks is
 * not copied yet or dirty); in dbt mode it goes to the source only and marks
 * its chunks dirty when it completes (and the copier clears the bit before it
 * reads), so the next pass copies them again.
 * Discards and write-zeroes follow the same rules.
 *
 * Snapshot mode keeps the source frozen: guest writes go to the active
 * delta (a sparse file, DELTA_PATH.g), after the chunk is copied into it from its
 * newest layer (copy on write, at chunk granularity, on the queue thread);
 * reads go to each chunk's newest layer (newest[c]: 0 the source, g the
 * delta of generation g).  ubm_mig_new_delta() freezes the active delta and
 * opens the next; the copier copies each chunk from its newest layer, except
 * the active one until the tail: once the folds are done, writes go to the
 * active delta and to the destination (snap_mirror, set by
 * ubm_mig_set_mode(MIRROR)), and a pass copies the active delta's chunks
 * with the guest going on, as mirror mode's pass does.  Deltas live until
 * the end: a cancel folds them back into the source.  Each copy on write is recorded
 * in the layer map (layermap.c), which a FLUSH or FUA write makes durable
 * before it is acknowledged: a daemon that dies leaves the deltas and the map,
 * and `serve` (a takeover or not) folds them back (ublkmig.snapshot).
 *
 * The files: chunks.c (state words, bitmaps, recorded errors), route.c (every
 * routing rule: the router the core calls), copier.c (the passes), snapshot.c
 * (deltas, copy on write, fold-back), layermap.c (the deltas' map on disk),
 * cutover.c (the switch and what it checks), control.c (start, finish, the
 * other calls of ubm.h, the counters).  Dependencies go one way: core and
 * backends below, nothing of ublk/ or sim/.
 */
#ifndef UBM_MIGRATE_H
#define UBM_MIGRATE_H

#include <stddef.h>

#include "backends/backends.h"
#include "core/core.h"

#define CH_COUNT 0x07ffffffu
#define CH_COW (1u << 27)
#define CH_COPIED (1u << 28)
#define CH_WAITERS (1u << 29)
#define CH_LOCKED (1u << 30)
/* A guest request's state while the migration routes it (route.c): the router's
 * own, by queue and tag, so the core's struct ubm_io knows nothing of it. */
struct mig_io {
	uint8_t flags;           /* MIG_IO_* */
	uint32_t epoch;          /* the migration's epoch when routed (ubm_mig_reconnect) */
	uint64_t t_start;        /* when the request arrived (ns; 0: not routed yet) */
	uint64_t t_source_done;  /* MIG_IO_DEST_WAITS: when the source's part ended (ns) */
	uint64_t t_parked;       /* when it last parked (ns; 0: not parked) ... */
	uint8_t park_why;        /* ... and why: PARK_CHUNK or PARK_PAUSE */
	uint64_t map_mark;       /* snapshot, a FLUSH or FUA write: the layer map's records
				  * that must be durable before it is acknowledged */
};
#define MIG_IO_MIRRORED 1  /* sent to both sides */
#define MIG_IO_TRACKED 2   /* source only, touching copied chunks: dirty them when done */
#define MIG_IO_REFS 4      /* holds chunk references */
#define MIG_IO_DEST_FAILED 8  /* its destination part failed, and that is recorded */
#define MIG_IO_DEST_DONE 16   /* its destination part ended */
#define MIG_IO_WAITING 32     /* source done, waiting for the destination (counted) */
#define MIG_IO_DEST_WAITS 64  /* sent to the source and the destination alone (a mirrored
			       * write, a FLUSH): once the source's part ends, the guest
			       * waits for the destination (dest_waiting) */
/* a locked chunk or a copy on write; a pause (or the cutover's window) */
enum { PARK_CHUNK = 0, PARK_PAUSE = 1 };
#define FOLD_BATCH 64      /* snapshot fold-back: chunks copied per fdatasync of the source */
#define HOT_PASSES 2       /* dirtied again in this many dirty passes: defer to the final one */
#define MAX_COPY_DEPTH 16
/* a destination that can lose its connections (NBD) is flushed this often
 * while the copier runs: what a lost connection may have lost since is what
 * is copied again (ubm_mig_reconnect) */
#define FLUSH_INTERVAL_NS 1000000000ull
enum { CS_FREE = 0, CS_LOCKING, CS_READING, CS_CHECKING, CS_WRITING };
struct copy_slot {
	int state;
	unsigned from;     /* backend slot the chunk is read from */
	uint64_t chunk;
	bool first_copy;   /* the copier has not copied the chunk before */
	bool fresh;        /* ... and nothing wrote it on the destination: on a zeroed
			    * destination it reads as zeroes */
	bool check;        /* resuming: compare with the destination's before writing */
	bool zero;         /* the source chunk reads as zeroes */
	uint64_t t_start;  /* when the copy began (ns) */
	void *buf;
	void *check_buf;   /* the destination's chunk, when checking */
};
/* layermap.c: snapshot mode's layer map on disk (PREFIX.map; the ordering
 * rules are in that file) */
struct ubm_layer_map {
	int fd;                 /* -1: none (not snapshot mode) */
	bool created;           /* this migration created the file (unlink it at the end) */
	pthread_mutex_t lock;
	uint64_t n;             /* records in the file (atomic) */
	uint64_t committed;     /* ... of which durable, after their data */
	int error;              /* a commit failed: every later one fails */
};
int ubm_layer_map_create(struct ubm_layer_map *lm, const char *path, uint64_t size,
			 uint64_t chunk_size);
/* chunk's newest data is now in generation gen (its copy on write is complete;
 * 0: folded back into the source): the record goes to the file at once */
int ubm_layer_map_add(struct ubm_layer_map *lm, uint64_t chunk, uint32_t gen);
/* the records added so far: what a FLUSH routed now must find durable */
uint64_t ubm_layer_map_mark(struct ubm_layer_map *lm);
/* make fds (the deltas) durable, then the records, then count those below upto */
int ubm_layer_map_commit(struct ubm_layer_map *lm, uint64_t upto, const int *fds, unsigned nfds);
void ubm_layer_map_close(struct ubm_layer_map *lm);

/* pacer.c: the copier's bursts and rests while the guest is busy */
enum { PACE_FREE = 0, PACE_BURST, PACE_REST };
struct mig_pacer {
	int phase;                 /* PACE_* */
	uint64_t t0, done0;        /* the phase's start (ns), and the guest's completions then */
	uint64_t rest_until;       /* PACE_REST: its end (ns) */
	double burst_ns, burst_done, rest_ns, rest_done;  /* decayed sums of the phases */
	double rest_ratio;         /* the next rest: this times the burst's length */
	double guest_share;        /* the guest's rate in bursts / in rests, last measured */
};

struct ubm_migration {
	struct ubm_router router;  /* what the core calls (route.c): t->router while it runs */
	struct ubm_target *t;
	struct mig_io *ios;        /* per guest request: queue q's tag i at [q * ios_per_queue + i] */
	unsigned ios_per_queue;
	uint64_t size, chunk_size, nr_chunks;
	unsigned chunk_shift;
	uint32_t *chunk;           /* state words */
	uint64_t *dirty;           /* bitmap */
	uint64_t *dest_written;    /* bitmap: chunks a guest write was sent to on the destination
				    * (a zero chunk there is not known to read as zeroes) */
	uint64_t *unflushed;       /* bitmap: chunks written on the destination since its last
				    * successful flush (a lost connection may have lost them) */
	uint8_t *hot;              /* dirty passes a chunk was copied in, in a row */
	uint8_t *newest;           /* snapshot: generation holding each chunk's newest data */
	struct ubm_backend delta[UBM_MAX_DELTAS];
	uint32_t gen;              /* snapshot: the active delta's generation (1..) */
	uint64_t delta_chunks, cow_chunks;
	char *delta_path;          /* snapshot: deltas DELTA_PATH.g, map DELTA_PATH.map */
	struct ubm_layer_map map;  /* snapshot: which delta holds each chunk, on disk */
	bool map_open;
	bool delta_created[UBM_MAX_DELTAS];
	bool deltas_done;          /* folded back or cut over: the files can go */
	uint32_t mode;
	uint32_t snap_mirror;      /* snapshot, its tail: writes to the active delta are
				    * mirrored to the destination too (route.c) */
	uint32_t paused;
	uint32_t abort;
	uint32_t cut_over;
	uint32_t switching;        /* the cutover's window is open (cutover.c) */
	uint64_t window_start_ns, cutover_pause_ns;
	uint64_t last_flush_ns;    /* the copier's last flush of the destination */
	int32_t error;
	uint32_t epoch;            /* ubm_mig_reconnect() count: failures routed before are old */
	uint32_t delta_failed;     /* snapshot: DELTA_FAILED or DELTA_UNFOLDABLE, else 0 */
	bool dest_zeroed;
	uint64_t check_below;      /* resuming: first chunks maybe on the destination already */
	uint64_t speed;
	uint64_t inflight;         /* guest requests routed by the migration */
	uint64_t unmirrored;       /* ... of which writes to copied chunks on the source only */
	uint64_t dirty_count, hot_count, chunks_copied, cursor;
	uint64_t bytes_copied, bytes_skipped, bytes_read, bytes_matched, passes;
	uint64_t mirrored_writes, tracked_writes, parked, dest_errors;
	uint64_t max_latency_ns, cutover_latency_ns, cutover_ns;
	uint64_t mirror_waits, mirror_wait_ns;
	uint64_t ahead_writes;     /* guest writes to chunks not copied yet: the source alone */
	uint64_t chunk_wait_ns, pause_wait_ns;  /* guest requests parked on a chunk, a pause */
	uint64_t dest_waiting;     /* mirrored writes and flushes done on the source, not yet
				    * on the destination */
	uint64_t dest_waiting_since; /* ... the sum of the times their source parts ended */
	uint64_t yield_ns;         /* the copier held back for guest I/O (pacer.c) */
	uint64_t pause_start_ns, last_pause_ns;
	/* the copier */
	struct ubm_queue copier;   /* the copier's queue (its ring, its ios by slot) */
	struct copy_slot slots[MAX_COPY_DEPTH];
	unsigned copy_depth;
	unsigned busy_depth;       /* chunks in a burst while the guest has requests in flight */
	struct mig_pacer pacer;    /* ... and the rests between bursts (the copier thread's) */
	uint32_t drained;          /* a futex: bumped as a locked chunk's last write ends
				    * (mig_chunks_put), waking a copier waiting for it */
};
#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define A_ADD(p, v) __atomic_add_fetch((p), (v), __ATOMIC_SEQ_CST)
#define A_SUB(p, v) __atomic_sub_fetch((p), (v), __ATOMIC_SEQ_CST)

/*
 * Snapshot: a delta (beside the source) failed, e.g. its filesystem is full.
 * The guest must not see that: the migration fails, and guest writes wait
 * (parked) until ubm_mig_finish() has folded the deltas back into the
 * source, then go there.
 */
enum {
	DELTA_FAILED = 1,      /* guest writes wait for the fold-back */
	DELTA_UNFOLDABLE = 2,  /* the fold-back failed too: they go on (and fail as they would) */
};

/* The migration running on t (NULL: none): the router it installed. */
static inline struct ubm_migration *mig_of(const struct ubm_target *t)
{
	struct ubm_router *r = __atomic_load_n(&t->router, __ATOMIC_ACQUIRE);

	return r ? (struct ubm_migration *)((char *)r - offsetof(struct ubm_migration, router))
		 : NULL;
}

/* Whether the destination and the deltas go in the rings' fixed-file tables.
 * Before Linux 6.13 io_uring drops an unregistered file only once every
 * request issued before the update has completed, and a queue's idle FETCH
 * commands never do: a cancelled migration would keep its destination open
 * until the device stops.  There they are named by plain fds.  -1 (the
 * default) decides by the running kernel; tests set 0 or 1. */
extern int ubm_fixed_migration_files;

/* route.c: the router (every routing rule) */
extern const struct ubm_router_ops ubm_mig_router_ops;

/* chunks.c */
void mig_atomic_max(uint64_t *p, uint64_t v);
void mig_set_error(struct ubm_migration *m, int err);
void mig_dest_failed(struct ubm_migration *m, uint32_t epoch, int err);
void mig_fail_deltas(struct ubm_migration *m, int err);
void mig_mark_dirty(struct ubm_migration *m, uint64_t c);
bool mig_clear_dirty(struct ubm_migration *m, uint64_t c);
bool mig_chunks_get(struct ubm_migration *m, uint64_t c0, uint64_t c1);
void mig_chunks_put(struct ubm_migration *m, uint64_t c0, uint64_t c1);

/* control.c */
/* What each ubm_mig_* call checks first: 0 if a migration runs (and, with
 * before_cutover, has not cut over), else the error, its text set. */
int mig_check(const struct ubm_migration *m, bool before_cutover);
void mig_wait_inflight(struct ubm_migration *m);
void mig_free(struct ubm_migration *m);
int mig_file_index(unsigned slot);
int mig_install(struct ubm_migration *m, unsigned slot, struct ubm_backend *be);

/* snapshot.c */
int mig_sync_dir_of(const char *path);
int mig_open_delta(struct ubm_migration *m, unsigned g);
int mig_snapshot_cow(struct ubm_migration *m, uint64_t c, bool mirrored);
int mig_fold_back(struct ubm_migration *m);

/* cutover.c */
int mig_flush_dest(struct ubm_migration *m);

/* pacer.c: how many copy slots the copier may have busy at now (ns; busy of
 * them are), the guest having completed `guest` requests so far
 * (ubm_target_completed); how long the rest it is in lasts still (ns, 0: none) */
unsigned mig_pace(struct ubm_migration *m, unsigned busy, uint64_t now, uint64_t guest);
uint64_t mig_pace_rest_left(const struct ubm_migration *m, uint64_t now);

/* copier.c */
void mig_copier_backend_done(struct ubm_queue *q, unsigned tag, unsigned slot, int res);

/* ---- small helpers ---- */

/* ---- chunk bitmaps: the dirty map, what the destination was written ------------ */

static inline bool bit_test(uint64_t *map, uint64_t c)
{
	return A_LOAD(&map[c / 64]) & (1ull << (c % 64));
}

static inline void bit_set(uint64_t *map, uint64_t c)
{
	uint64_t bit = 1ull << (c % 64);

	if (!(A_LOAD(&map[c / 64]) & bit))
		__atomic_fetch_or(&map[c / 64], bit, __ATOMIC_SEQ_CST);
}

static inline bool is_dirty(struct ubm_migration *m, uint64_t c)
{
	return bit_test(m->dirty, c);
}

static inline bool is_write(uint8_t op)
{
	return op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_DISCARD || op == UBLK_IO_OP_WRITE_ZEROES;
}

/* Snapshot: the backend slot holding the newest data of chunk c. */
static inline unsigned layer_slot(struct ubm_migration *m, uint64_t c)
{
	unsigned gen = A_LOAD(&m->newest[c]);

	return gen ? SLOT_DELTA0 + gen - 1 : SLOT_SOURCE;
}

/* The length of chunk c (the last may be short). */
static inline uint32_t chunk_len(struct ubm_migration *m, uint64_t c)
{
	uint64_t off = c << m->chunk_shift;

	return (uint32_t)(m->size - off < m->chunk_size ? m->size - off : m->chunk_size);
}

#endif
