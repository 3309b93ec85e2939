/* SPDX-License-Identifier: MIT */
/* Control commands to the ublk driver through /dev/ublk-control. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ublk/ublk.h"

int ubm_ctrl_open(struct ubm_ctrl *c)
{
	int ret;

	c->fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
	if (c->fd < 0)
		return ubm_fail(errno, "cannot open /dev/ublk-control: %s", strerror(errno));
	/* control commands carry an 80-byte payload: 128-byte SQEs */
	ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
	if (ret < 0) {
		close(c->fd);
		c->fd = -1;
		return ubm_fail(ret, "io_uring setup for ublk control failed: %s", strerror(-ret));
	}
	pthread_mutex_init(&c->lock, NULL);
	return 0;
}

void ubm_ctrl_close(struct ubm_ctrl *c)
{
	if (c->fd < 0)
		return;
	io_uring_queue_exit(&c->ring);
	close(c->fd);
	c->fd = -1;
	pthread_mutex_destroy(&c->lock);
}

/* Issue one control command and wait for its result. */
int ubm_ctrl_cmd(struct ubm_ctrl *c, unsigned cmd_op, uint32_t dev_id, void *buf, uint16_t len,
		 uint64_t data0)
{
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	struct ublksrv_ctrl_cmd *cmd;
	int ret;

	pthread_mutex_lock(&c->lock);
	sqe = io_uring_get_sqe(&c->ring);
	if (!sqe) {
		pthread_mutex_unlock(&c->lock);
		return -EBUSY;
	}
	memset(sqe, 0, 2 * sizeof(*sqe));
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = c->fd;
	sqe->cmd_op = cmd_op;
	cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;
	cmd->dev_id = dev_id;
	cmd->queue_id = (uint16_t)-1;
	cmd->addr = (uint64_t)(uintptr_t)buf;
	cmd->len = len;
	cmd->data[0] = data0;
	ret = io_uring_submit(&c->ring);
	if (ret >= 0) {
		do {
			ret = io_uring_wait_cqe(&c->ring, &cqe);
		} while (ret == -EINTR);
	}
	if (ret >= 0) {
		ret = cqe->res;
		io_uring_cqe_seen(&c->ring, cqe);
	}
	pthread_mutex_unlock(&c->lock);
	return ret;
}

UBM_EXPORT int ubm_get_features(uint64_t *features)
{
	struct ubm_ctrl c;
	int ret;

	if (access("/dev/ublk-control", F_OK) != 0)
		return ubm_fail(ENOENT, "/dev/ublk-control does not exist (ublk_drv not loaded)");
	ret = ubm_ctrl_open(&c);
	if (ret < 0)
		return ret;
	*features = 0;
	ret = ubm_ctrl_cmd(&c, UBLK_U_CMD_GET_FEATURES, (uint32_t)-1, features, sizeof(*features), 0);
	ubm_ctrl_close(&c);
	if (ret == -EINVAL || ret == -EOPNOTSUPP)
		return ubm_fail(EOPNOTSUPP, "the ublk driver is too old to report its features");
	if (ret < 0)
		return ubm_fail(ret, "UBLK_U_CMD_GET_FEATURES failed: %s", strerror(-ret));
	return 0;
}

UBM_EXPORT int ubm_choose_path(uint64_t features)
{
	if (features & UBLK_F_AUTO_BUF_REG)
		return UBM_PATH_AUTO_ZC;
	if (features & UBLK_F_SUPPORT_ZERO_COPY)
		return UBM_PATH_ZC;
	return UBM_PATH_COPY;
}

UBM_EXPORT const char *ubm_path_name(int path)
{
	switch (path) {
	case UBM_PATH_AUTO: return "auto";
	case UBM_PATH_AUTO_ZC: return "auto-zc";
	case UBM_PATH_ZC: return "zc";
	case UBM_PATH_COPY: return "copy";
	}
	return "?";
}
