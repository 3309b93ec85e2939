/* SPDX-License-Identifier: MIT */
/*
 * ublkmig data plane: the public API the Python control plane calls (ctypes).
 *
 * Everything that touches an individual guest I/O lives behind this API; the
 * control plane only creates, starts, stops and deletes devices and reads
 * counters.  All functions return 0 or a negative errno unless noted.
 */
#ifndef UBM_H
#define UBM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UBM_API_VERSION 5

/* Data path a device uses to move request data between the kernel and the
 * backends.  Chosen from the driver's features unless forced. */
enum ubm_data_path {
	UBM_PATH_AUTO = 0,     /* pick the best the kernel offers */
	UBM_PATH_AUTO_ZC = 1,  /* UBLK_F_AUTO_BUF_REG (Linux 6.16+) */
	UBM_PATH_ZC = 2,       /* UBLK_F_SUPPORT_ZERO_COPY, explicit register (6.15+) */
	UBM_PATH_COPY = 3,     /* per-tag buffers, the kernel copies */
};

struct ubm_config {
	const char *source_path;   /* image file or block device, or an NBD export
				    * (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH) */
	uint32_t nr_queues;        /* 1..64 */
	uint32_t queue_depth;      /* 1..4096 */
	uint32_t logical_bs;       /* 512 or 4096 */
	uint32_t max_io_bytes;     /* largest request, e.g. 512 KiB */
	uint32_t read_only;        /* 0/1 */
	uint32_t direct;           /* open the backend with O_DIRECT */
	uint32_t data_path;        /* enum ubm_data_path; UBM_PATH_AUTO to choose */
	int32_t dev_id;            /* -1: let the kernel choose */
	uint32_t recover;          /* 0/1: take over device dev_id, whose server died (its
				    * geometry and data path come from the device) */
	int32_t source_fd;         /* > 0: the caller's descriptor on the source (checked,
				    * locked): opened again through it, never by the path,
				    * which may name another file by now (0: by the path) */
	uint32_t timeout_ms;       /* an NBD source: the longest wait for the server (a
				    * reply, the dial and handshake) before the connection
				    * counts as lost (0: 30 s) */
	uint32_t wait_ms;          /* the backend serving the device lost a connection (NBD,
				    * also a destination after the cutover): how long a guest
				    * request waits for ubm_reconnect() before it fails
				    * (0: 60 s) */
};

/* Counters summed over the queues; monotonic except inflight. */
struct ubm_stats {
	uint64_t reads, writes, flushes, discards, write_zeroes;
	uint64_t read_bytes, write_bytes;
	uint64_t errors;           /* I/Os completed with an error */
	uint64_t inflight;         /* I/Os being handled right now */
	uint64_t fua_writes;
	uint64_t parked;           /* requests that waited for a chunk copy or a pause */
	uint64_t conn_down;        /* connections of the backend serving the device lost now */
	uint64_t conn_waiting;     /* guest requests waiting now for ubm_reconnect() */
	uint64_t conn_waits;       /* guest requests that waited for a connection, in all ... */
	uint64_t conn_failed;      /* ... and failed, as none came back within wait_ms */
};

struct ubm_dev;
struct ubm_target;  /* what serves a device's (or a simulator's) requests */

/* UBLK_U_CMD_GET_FEATURES of the running driver.  -ENOENT: no
 * /dev/ublk-control; -EOPNOTSUPP: driver too old to answer. */
int ubm_get_features(uint64_t *features);

/* Which data path UBM_PATH_AUTO would choose for these features. */
int ubm_choose_path(uint64_t features);

/* Name of a data path ("auto-zc", "zc", "copy"). */
const char *ubm_path_name(int path);

/* Open the source, add the device (ADD_DEV), set its parameters; or, with
 * cfg->recover, take over device cfg->dev_id (GET_DEV_INFO, GET_PARAMS: the
 * source must have at least its size, and serves that much of itself, as a
 * migration to a larger destination leaves it; START_USER_RECOVERY).  Devices
 * are added with UBLK_F_USER_RECOVERY and _REISSUE: they outlive a server that dies, holding
 * their I/O until another takes over.  On success *out holds the device; its
 * id is ubm_dev_id(). */
int ubm_dev_create(const struct ubm_config *cfg, struct ubm_dev **out);

/* A device whose server died (-ENOENT: no such device; -EBUSY: its server lives;
 * -EINVAL: not recoverable): STOP_DEV and DEL_DEV, failing the I/O it held queued. */
int ubm_dev_remove_orphan(uint32_t dev_id);

/* Start the queue threads and START_DEV (or END_USER_RECOVERY, recovering);
 * returns once the kernel has accepted the device (the block device node may
 * appear a moment later).  Recovered, the requests the dead server held are
 * issued again. */
int ubm_dev_start(struct ubm_dev *dev);

/* STOP_DEV: in-flight I/O is completed, further I/O fails; waits for the
 * queue threads to finish.  Safe to call more than once. */
int ubm_dev_stop(struct ubm_dev *dev);

/* DEL_DEV (if added), close everything, free.  Stops first if needed. */
void ubm_dev_destroy(struct ubm_dev *dev);

int ubm_dev_id(const struct ubm_dev *dev);
uint64_t ubm_dev_size(const struct ubm_dev *dev);
int ubm_dev_path(const struct ubm_dev *dev);       /* enum ubm_data_path in use */
uint64_t ubm_dev_flags(const struct ubm_dev *dev);  /* ublk flags the device was added with */
uint32_t ubm_dev_nr_queues(const struct ubm_dev *dev); /* queues granted (<= asked, <= CPUs) */
/* The configuration in effect: queues granted, and a recovered device's own
 * geometry (source_path: the device's copy, valid while it lives). */
void ubm_dev_config(const struct ubm_dev *dev, struct ubm_config *out);
void ubm_dev_stats(const struct ubm_dev *dev, struct ubm_stats *out);

/* The backend serving the target (NBD: the source, or the destination after a
 * cutover) lost connections (ubm_stats.conn_down): dial them again
 * (blocking, within its timeout), and let the guest requests waiting for
 * them go on.  -EOPNOTSUPP for a file; the dial's error if the server is not
 * back (the requests wait on, up to wait_ms each).  (A destination before
 * the cutover: ubm_mig_reconnect().) */
int ubm_reconnect(struct ubm_target *t);

/* Human-readable reason for the last failure in this thread (or ""). */
const char *ubm_last_error(void);

/* ---- migration ---------------------------------------------------------------
 * Moves a target's data to a destination while it serves I/O.  The calls
 * act on a target: ubm_dev_target() of a device, ubm_sim_target() of a
 * simulator.  The control plane drives the passes (the policy); the data
 * plane routes every request and copies chunks.  Calls on one target must
 * not overlap, except ubm_mig_abort()/ubm_mig_set_speed()/ubm_mig_get_stats(),
 * which may be called while a pass runs. */
struct ubm_target *ubm_dev_target(struct ubm_dev *dev);

enum ubm_mig_mode {
	UBM_MIG_MIRROR = 0,    /* writes go to both sides, but for those ahead of the copier */
	UBM_MIG_DBT = 1,       /* writes go to the source; the chunks they touch go dirty */
	UBM_MIG_SNAPSHOT = 2,  /* writes go to a delta (the source is frozen); the copier
				* folds frozen deltas into the destination */
};

struct ubm_mig_config {
	const char *dest_path;     /* file or block device, at least the source's size */
	uint32_t mode;             /* enum ubm_mig_mode */
	uint32_t dest_zeroed;      /* the destination reads as zeroes (a new sparse file) */
	uint64_t chunk_size;       /* power of two, 64 KiB .. 64 MiB; snapshot mode: at least
				    * the largest request (512 KiB on a device, 256 KiB in
				    * the simulator) */
	uint64_t speed;            /* copier bytes/s, 0 = unlimited */
	uint32_t direct;           /* open the destination with O_DIRECT */
	uint32_t copy_depth;       /* chunks the copier keeps in flight (0: 4) */
	uint32_t busy_depth;       /* chunks read from the source at a time while guest
				    * requests are in flight, with a rest after each read
				    * as long as it took: the copier yields the source to
				    * the guest (0: copy_depth, no yielding) */
	const char *delta_path;    /* snapshot: the deltas are DELTA_PATH.1, .2, ... and
				    * their layer map DELTA_PATH.map (created, never
				    * reused: an existing map fails the start); removed
				    * once the migration ends with its deltas folded back
				    * or cut over.  NULL: SOURCE.ublkmig-delta */
	uint64_t check_below;      /* resuming: chunks below this may hold an earlier copy;
				    * their first copy reads the destination's and writes
				    * only if it differs (0: none) */
	int32_t dest_fd;           /* > 0: a file destination the caller checked and locked,
				    * opened again through it (0: by the path) */
	uint32_t dest_timeout_ms;  /* an NBD destination: the longest wait for the server
				    * (a reply, the dial and handshake), after which the
				    * connection counts as lost (0: 30 s) */
};

/* Which chunks a pass copies.  In snapshot mode every pass but the final
 * one copies the chunks whose newest data is in the base or a frozen delta
 * (never the active delta); the final one (paused) takes the active too. */
enum ubm_pass {
	UBM_PASS_ALL = 0,    /* every chunk not yet copied, and dirty ones */
	UBM_PASS_DIRTY = 1,  /* dirty chunks, except hot ones (dirtied pass after pass) */
	UBM_PASS_FINAL = 2,  /* every dirty chunk, hot ones included */
};

struct ubm_mig_stats {
	uint64_t size, chunk_size, nr_chunks;
	uint64_t chunks_copied;    /* chunks the destination holds */
	uint64_t cursor;           /* first chunk the current pass has not reached */
	uint64_t dirty_chunks;     /* chunks to copy again */
	uint64_t hot_chunks;       /* dirty chunks deferred to the tail (or the final pass) */
	uint64_t bytes_copied;     /* written to the destination by the copier */
	uint64_t bytes_skipped;    /* not written: holes and zero chunks on a zeroed destination */
	uint64_t bytes_read;       /* read from the source by the copier */
	uint64_t passes;
	uint64_t mirrored_writes;  /* guest writes sent to both sides */
	uint64_t tracked_writes;   /* guest writes to copied chunks sent to the source only
				    * (dbt: their chunks go dirty) */
	uint64_t parked;           /* guest requests that waited for a chunk or a pause */
	uint64_t dest_errors;      /* destination operations that failed */
	uint64_t max_latency_ns;   /* longest guest request while migrating */
	uint64_t cutover_latency_ns; /* longest guest request around the cutover (±1 s) */
	uint64_t last_pause_ns;    /* length of the last pause of guest I/O */
	int32_t error;             /* first destination (or copier source) error, -errno */
	uint32_t mode;
	uint32_t paused;
	uint32_t cut_over;
	uint32_t generation;       /* snapshot: the active delta (1, 2, ...) */
	uint64_t delta_chunks;     /* snapshot: chunks whose newest data is in the active delta */
	uint64_t cow_chunks;       /* snapshot: chunks copied into a delta before a write */
	uint32_t delta_failed;     /* snapshot: a delta failed (error says how); guest writes
				    * wait until ubm_mig_finish() folds the deltas back */
	uint32_t dest_down;        /* connections to the destination (NBD) lost, not yet
				    * replaced: ubm_mig_reconnect() can bring them back */
	uint64_t mirror_waits;     /* mirrored writes whose source part ended first ... */
	uint64_t mirror_wait_ns;   /* ... and how long, in all, they then waited for the
				    * destination (the cost of mirroring to the guest) */
	uint64_t bytes_matched;    /* resuming: checked on the destination and found equal,
				    * so not written */
	uint64_t yield_ns;         /* time the copier held back reads (busy_depth, rests)
				    * because guest requests were in flight */
	uint64_t cutover_pause_ns; /* guest I/O paused around the switch (snapshot's final
				    * pause, from ubm_mig_cutover_prepare to _switch; 0 in
				    * mirror and DBT mode, which hold nothing for it) */
	uint64_t dest_waiting;     /* mirrored writes and flushes done on the source, waiting
				    * now for the destination ... */
	uint64_t dest_waiting_ns;  /* ... and how long, on average, they have waited so far */
	uint64_t ahead_writes;     /* guest writes to chunks not copied yet, sent to the source
				    * alone (the copier copies those chunks after them) */
	uint64_t chunk_wait_ns;    /* guest requests parked on a chunk being copied (or copied
				    * on write), in all */
	uint64_t pause_wait_ns;    /* guest requests parked by a pause of guest I/O, in all */
};

/* Open the destination, check it, and start routing guest I/O through the
 * migration (nothing is copied yet). */
int ubm_mig_start(struct ubm_target *t, const struct ubm_mig_config *cfg);
/* Copy one pass (enum ubm_pass); blocks until done.  *chunks: how many it
 * copied.  -ECANCELED after ubm_mig_abort(); a destination error fails it. */
int ubm_mig_copy_pass(struct ubm_target *t, uint32_t pass, uint64_t *chunks);
/* Switch how guest writes go: MIRROR or DBT (enum ubm_mig_mode).  A snapshot
 * migration stays one: MIRROR mirrors the writes to its active delta to the
 * destination too (its tail: a pass then copies the active delta's chunks
 * with the guest going on, and the cutover needs no pause), SNAPSHOT stops
 * that.  -EBUSY in the cutover's window. */
int ubm_mig_set_mode(struct ubm_target *t, uint32_t mode);
int ubm_mig_set_speed(struct ubm_target *t, uint64_t bytes_per_second);
/* Snapshot: freeze the active delta and start a fresh one (guest I/O is
 * paused for the switch); the next pass folds the frozen one.  -ENOSPC when
 * no more deltas can be opened. */
int ubm_mig_new_delta(struct ubm_target *t);
/* Hold new guest requests and wait until those in flight are done. */
int ubm_mig_pause(struct ubm_target *t);
int ubm_mig_resume(struct ubm_target *t);
/* The cutover, in two steps.  ubm_mig_cutover_prepare() checks that the
 * destination holds every byte, flushes it and opens the cutover's window:
 * -EAGAIN unless every chunk is copied and clean (and, in DBT and snapshot
 * mode, guest I/O is paused), -EIO after a destination failure, -ENOTCONN
 * with connections lost, -EBUSY with a window open; on any error no window
 * stays open.  Guest I/O goes on in the window (a mirrored write whose
 * destination part fails waits for its end); the mode cannot change.  The
 * caller makes durable its record that the destination is the disk, then
 * calls ubm_mig_cutover_switch(UBM_CUTOVER_COMMIT): every request goes to
 * the destination from then on.  That fails (-EIO) if the destination
 * failed in the window, which then stays open: the caller makes its record
 * name the source again and cancels (UBM_CUTOVER_CANCEL, the source stays
 * the disk), or, if it cannot, commits with UBM_CUTOVER_FORCE (the writes
 * that failed are tried again on the destination, which its record names).
 * ubm_mig_cutover() is prepare and commit with no record between. */
enum ubm_cutover_step {
	UBM_CUTOVER_CANCEL = 0,
	UBM_CUTOVER_COMMIT = 1,
	UBM_CUTOVER_FORCE = 2,
};
int ubm_mig_cutover_prepare(struct ubm_target *t);
int ubm_mig_cutover_switch(struct ubm_target *t, uint32_t how);
int ubm_mig_cutover(struct ubm_target *t);
/* With guest I/O paused: compare every chunk of the destination with the
 * disk's current content (the source, or in snapshot mode the newest
 * delta holding it).  *mismatched: chunks that differ (0 when verified). */
int ubm_mig_verify(struct ubm_target *t, uint64_t *mismatched);
/* A destination reached over connections (NBD) lost some: dial them again
 * (blocking), and clear the migration's error, which the lost connections
 * caused (the writes they lost left their chunks dirty; the next pass copies
 * them).  -EOPNOTSUPP for a file destination; the dial's error if the server
 * is not back. */
int ubm_mig_reconnect(struct ubm_target *t);
/* Make a running pass stop soon (any thread). */
int ubm_mig_abort(struct ubm_target *t);
/* Stop routing through the migration.  After a cutover the destination
 * goes on serving; otherwise the source does and the destination is closed
 * (in snapshot mode the deltas are first folded back into the source, with
 * guest I/O paused). */
int ubm_mig_finish(struct ubm_target *t);
int ubm_mig_get_stats(struct ubm_target *t, struct ubm_mig_stats *out);

/* ---- simulation: the data plane without the ublk driver -----------------
 * A sim target runs the same request handling and backend code as a ublk
 * queue, fed by the caller instead of the kernel; host tests use it.  One
 * caller thread at a time. */
struct ubm_sim;
int ubm_sim_create(const char *source_path, uint32_t logical_bs, uint32_t direct,
		   uint32_t depth, struct ubm_sim **out);
/* Submit one request (UBLK_IO_OP_* op, UBLK_IO_F_* flags, at most 256 KiB);
 * buf must hold len bytes for READ/WRITE.  Returns a ticket (>= 0) or -errno. */
int ubm_sim_submit(struct ubm_sim *sim, uint32_t op, uint32_t flags, uint64_t offset,
		   uint32_t len, void *buf);
/* Wait for any submitted request; stores ticket and result (bytes or -errno).
 * Returns 0, or -EAGAIN when nothing is in flight. */
int ubm_sim_wait(struct ubm_sim *sim, int *ticket, int *result);
uint64_t ubm_sim_size(const struct ubm_sim *sim);
struct ubm_target *ubm_sim_target(struct ubm_sim *sim);
/* Run the simulator's ring until its doorbell and completions are handled,
 * without waiting (for a caller that does not submit meanwhile). */
int ubm_sim_poll(struct ubm_sim *sim);
/* How long a request waits for a lost connection of an NBD source (the
 * config's wait_ms; 0: 60 s). */
int ubm_sim_set_wait(struct ubm_sim *sim, uint32_t ms);
/* Delay every write, discard, write-zeroes and flush to a file backend: the source (slot 0)
 * or the destination (slot 1, after ubm_mig_start) by ns: widens races. */
int ubm_sim_set_delay(struct ubm_sim *sim, uint32_t slot, uint64_t ns);
void ubm_sim_stats(const struct ubm_sim *sim, struct ubm_stats *out);
void ubm_sim_destroy(struct ubm_sim *sim);

#ifdef __cplusplus
}
#endif
#endif
