/* SPDX-License-Identifier: MIT */
/*
 * A ublk queue: one thread and one io_uring, fetching requests from the driver
 * (FETCH_REQ), handing each to the core, and committing its result with the
 * next fetch (COMMIT_AND_FETCH_REQ).
 */
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ublk/ublk.h"

size_t ubm_ublk_iods_stride(void)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	return (UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc) + page - 1) & ~(page - 1);
}

static void prep_io_cmd(struct ubm_queue *q, unsigned tag, unsigned cmd_op, int result)
{
	struct io_uring_sqe *sqe = ubm_queue_sqe(q);
	struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;
	struct ubm_io *io = &q->ios[tag];

	io_uring_prep_read(sqe, 0, NULL, 0, 0);  /* clears the fields we rely on */
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->flags = IOSQE_FIXED_FILE;           /* fixed file 0: /dev/ublkcN */
	sqe->cmd_op = cmd_op;
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->result = result;
	cmd->addr = q->path == UBM_PATH_COPY ? (uint64_t)(uintptr_t)io->buf : 0;
	if (q->path == UBM_PATH_AUTO_ZC)
		sqe->addr = tag;  /* struct ublk_auto_buf_reg: index = tag, no flags */
	io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_CMD, 0));
	io->state = IO_FETCHING;
	q->cmds_inflight++;
}

void ubm_ublk_commit(struct ubm_queue *q, unsigned tag, int res)
{
	prep_io_cmd(q, tag, UBLK_U_IO_COMMIT_AND_FETCH_REQ, res);
}

static void cmd_cqe(struct ubm_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned tag = ubm_ud_tag(cqe->user_data);
	struct ubm_io *io = &q->ios[tag];
	const struct ublksrv_io_desc *iod;

	q->cmds_inflight--;
	if (ubm_unlikely(cqe->res != UBLK_IO_RES_OK)) {
		/* UBLK_IO_RES_ABORT: the device is going away; this tag is done */
		io->state = IO_IDLE;
		return;
	}
	iod = &q->iods[tag];
	io->req.op = ublksrv_get_op(iod);
	io->req.flags = ublksrv_get_flags(iod);
	io->req.offset = iod->start_sector << 9;
	io->req.len = iod->nr_sectors << 9;
	io->req.buf = io->buf;
	io->req.buf_off = 0;
	io->req.buf_index = (q->path != UBM_PATH_COPY &&
			     (io->req.op == UBLK_IO_OP_READ || io->req.op == UBLK_IO_OP_WRITE))
		? (int)tag : -1;
	ubm_queue_start_io(q, tag);
}

static int queue_init(struct ubm_dev *dev, struct ubm_queue *q)
{
	unsigned tag;
	int ret;

	q->cmd_cqe = cmd_cqe;
	ret = ubm_queue_ring_init(q, q->depth * 4, dev->cdev_fd, q->path != UBM_PATH_COPY, true);
	if (ret < 0)
		return ret;
	for (tag = 0; tag < q->depth; tag++) {
		if (q->path == UBM_PATH_COPY) {
			if (posix_memalign(&q->ios[tag].buf, 4096, dev->info.max_io_buf_bytes))
				return ubm_fail(ENOMEM, "out of memory for I/O buffers");
		}
		prep_io_cmd(q, tag, UBLK_U_IO_FETCH_REQ, -1);
	}
	ret = io_uring_submit(&q->ring);
	if (ret < 0)
		return ubm_fail(ret, "submitting FETCH_REQ failed: %s", strerror(-ret));
	return 0;
}

void *ubm_ublk_queue_thread(void *arg)
{
	struct ubm_queue *q = arg;
	struct ubm_dev *dev = q->dev;
	sigset_t all;
	char name[16];
	int ret;

	/* signals belong to the control plane's thread */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	snprintf(name, sizeof(name), "ubm-q%u", q->q_id);
	pthread_setname_np(pthread_self(), name);
	if (q->cpu >= 0) {
		cpu_set_t one;

		CPU_ZERO(&one);
		CPU_SET(q->cpu, &one);
		pthread_setaffinity_np(pthread_self(), sizeof(one), &one);  /* best effort */
	}

	q->init_err = queue_init(dev, q);
	sem_post(&dev->ready);
	while (q->init_err == 0) {
		if (q->ios_inflight == 0 && (q->cmds_inflight == 0 || q->stopping))
			break;
		ret = io_uring_submit_and_wait(&q->ring, 1);
		if (ubm_unlikely(ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)) {
			fprintf(stderr, "ublkmig: queue %u: io_uring_enter: %s\n", q->q_id,
				strerror(-ret));
			break;
		}
		ubm_queue_reap(q);
	}
	/* leftover fetch commands are cancelled as the ring goes; the
	 * doorbell stays open until the device is destroyed */
	if (q->ring_ok)
		io_uring_queue_exit(&q->ring);
	q->ring_ok = false;
	return NULL;
}
