/* SPDX-License-Identifier: MIT */
/*
 * The ublk driver's side: commands on /dev/ublk-control (ctrl.c), a device's
 * lifecycle and recovery (dev.c), and its queues, one thread each, fetching
 * requests from the driver and committing their results (queue.c).  The
 * requests themselves go through the core.
 */
#ifndef UBM_UBLK_H
#define UBM_UBLK_H

#include <semaphore.h>

#include "core/core.h"

/* ctrl.c: commands on /dev/ublk-control */
struct ubm_ctrl {
	int fd;
	struct io_uring ring;
	pthread_mutex_t lock;
};
int ubm_ctrl_open(struct ubm_ctrl *c);
void ubm_ctrl_close(struct ubm_ctrl *c);
int ubm_ctrl_cmd(struct ubm_ctrl *c, unsigned cmd_op, uint32_t dev_id, void *buf, uint16_t len,
		 uint64_t data0);


/* A device: its control state and its queues. */
struct ubm_dev {
	struct ubm_config cfg;
	struct ubm_ctrl ctrl;
	struct ublksrv_ctrl_dev_info info;
	struct ublk_params params;
	struct ubm_target tgt;
	struct ubm_queue *queues;
	unsigned nr_queues;
	int path;
	int cdev_fd;
	sem_t ready;
	unsigned nr_threads;     /* queue threads running (to join) */
	bool added, started, stopped;
	bool recovering;         /* taking over a dead server's device: not ours until
				  * END_USER_RECOVERY (a failure leaves it to the next try) */
};

/* queue.c: queue q's thread (its ring, its first FETCHes, then the loop) */
void *ubm_ublk_queue_thread(void *arg);
/* the committing completion sink of a ublk queue (q->io_done) */
void ubm_ublk_commit(struct ubm_queue *q, unsigned tag, int res);
/* the stride of a queue's request descriptors in the char device's mmap */
size_t ubm_ublk_iods_stride(void);

#endif
