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

#define UBM_API_VERSION 1

/* Data path a device uses to move request data between the kernel and the
 * backends.  Chosen from the driver's features unless forced. */
enum ubm_data_path {
	UBM_PATH_AUTO = 0,     /* pick the best the kernel offers */
	UBM_PATH_AUTO_ZC = 1,  /* UBLK_F_AUTO_BUF_REG (Linux 6.16+) */
	UBM_PATH_ZC = 2,       /* UBLK_F_SUPPORT_ZERO_COPY, explicit register (6.15+) */
	UBM_PATH_COPY = 3,     /* per-tag buffers, the kernel copies */
};

struct ubm_config {
	const char *source_path;   /* image file or block device */
	uint32_t nr_queues;        /* 1..64 */
	uint32_t queue_depth;      /* 1..4096 */
	uint32_t logical_bs;       /* 512 or 4096 */
	uint32_t max_io_bytes;     /* largest request, e.g. 512 KiB */
	uint32_t read_only;        /* 0/1 */
	uint32_t direct;           /* open the backend with O_DIRECT */
	uint32_t data_path;        /* enum ubm_data_path; UBM_PATH_AUTO to choose */
	int32_t dev_id;            /* -1: let the kernel choose */
};

/* Counters summed over the queues; monotonic except inflight. */
struct ubm_stats {
	uint64_t reads, writes, flushes, discards, write_zeroes;
	uint64_t read_bytes, write_bytes;
	uint64_t errors;           /* I/Os completed with an error */
	uint64_t inflight;         /* I/Os being handled right now */
	uint64_t fua_writes;
};

struct ubm_dev;

/* UBLK_U_CMD_GET_FEATURES of the running driver.  -ENOENT: no
 * /dev/ublk-control; -EOPNOTSUPP: driver too old to answer. */
int ubm_get_features(uint64_t *features);

/* Which data path UBM_PATH_AUTO would choose for these features. */
int ubm_choose_path(uint64_t features);

/* Name of a data path ("auto-zc", "zc", "copy"). */
const char *ubm_path_name(int path);

/* Open the source, add the device (ADD_DEV), set its parameters.  On
 * success *out holds the device; its id is ubm_dev_id(). */
int ubm_dev_create(const struct ubm_config *cfg, struct ubm_dev **out);

/* Start the queue threads and START_DEV; returns once the kernel has
 * accepted the device (the block device node may appear a moment later). */
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
void ubm_dev_stats(const struct ubm_dev *dev, struct ubm_stats *out);

/* Human-readable reason for the last failure in this thread (or ""). */
const char *ubm_last_error(void);

/* ---- simulation: the data plane without the ublk driver -----------------
 * A sim target runs the same request handling and backend code as a ublk
 * queue, fed by the caller instead of the kernel; host tests use it.  One
 * caller thread at a time. */
struct ubm_sim;
int ubm_sim_create(const char *source_path, uint32_t logical_bs, uint32_t direct,
		   uint32_t depth, struct ubm_sim **out);
/* Submit one request (UBLK_IO_OP_* op, UBLK_IO_F_* flags); buf must hold
 * len bytes for READ/WRITE.  Returns a ticket (>= 0) or -errno. */
int ubm_sim_submit(struct ubm_sim *sim, uint32_t op, uint32_t flags, uint64_t offset,
		   uint32_t len, void *buf);
/* Wait for any submitted request; stores ticket and result (bytes or -errno).
 * Returns 0, or -EAGAIN when nothing is in flight. */
int ubm_sim_wait(struct ubm_sim *sim, int *ticket, int *result);
uint64_t ubm_sim_size(const struct ubm_sim *sim);
void ubm_sim_stats(const struct ubm_sim *sim, struct ubm_stats *out);
void ubm_sim_destroy(struct ubm_sim *sim);

#ifdef __cplusplus
}
#endif
#endif
