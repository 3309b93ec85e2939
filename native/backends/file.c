/* SPDX-License-Identifier: MIT */
/* Backend: a regular file or a block device on this host, through io_uring. */
#include <fcntl.h>
#include <stdio.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backends/backends.h"

/* be_stage values for requests with a follow-up operation */
enum { STAGE_MAIN = 0, STAGE_SYNC = 1 };

static int file_open(struct ubm_backend *be, const char *path)
{
	int flags = (be->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (be->direct ? O_DIRECT : 0);
	struct stat st, via;
	char proc[32];
	int fd;

	if (be->via_fd > 0) {
		/* the same file, whatever the path names by now (a link swapped in) */
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", be->via_fd);
		if (fstat(be->via_fd, &via) < 0)
			return ubm_fail(errno, "%s: %s", path, strerror(errno));
		fd = open(proc, flags);
		if (fd >= 0 && (fstat(fd, &st) < 0 || st.st_dev != via.st_dev ||
				st.st_ino != via.st_ino)) {
			close(fd);
			return ubm_fail(ESTALE, "%s: reopening it gave another file", path);
		}
	} else {
		fd = open(path, flags);
	}
	if (fd < 0 && errno == EINVAL && be->direct)
		return ubm_fail(EINVAL, "%s: the filesystem does not support O_DIRECT (--direct)", path);
	if (fd < 0)
		return ubm_fail(errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0)
		goto fail_errno;
	if (S_ISBLK(st.st_mode)) {
		int sector = 512;

		be->is_blockdev = true;
		if (ioctl(fd, BLKGETSIZE64, &be->size) < 0 || ioctl(fd, BLKSSZGET, &sector) < 0)
			goto fail_errno;
		if (be->direct && (uint32_t)sector > be->logical_bs) {
			close(fd);
			return ubm_fail(EINVAL, "%s: its logical block size is %d, larger than %u", path,
					sector, be->logical_bs);
		}
		be->can_discard = true;
	} else if (S_ISREG(st.st_mode)) {
		be->size = (uint64_t)st.st_size;
		/* punching a hole past the end changes nothing: a safe probe */
		be->can_discard = !be->read_only &&
			fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				  (off_t)be->size, be->logical_bs) == 0;
	} else {
		close(fd);
		return ubm_fail(EINVAL, "%s: not a regular file or a block device", path);
	}
	be->fd = fd;
	return 0;
fail_errno:
	flags = errno;
	close(fd);
	return ubm_fail(flags, "%s: %s", path, strerror(flags));
}

static int zeroes_mode(const struct ubm_backend *be, const struct ubm_req *req)
{
	/* a block device zeroes a range itself (falling back to writing
	 * zeroes); a file prefers deallocating, unless asked not to unmap */
	if (be->is_blockdev || ((req->flags & UBLK_IO_F_NOUNMAP) && !be->no_zero_range))
		return FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
	return FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
}

static void prep_sync(struct ubm_backend *be, struct io_uring_sqe *sqe)
{
	io_uring_prep_fsync(sqe, ubm_be_fd(be), IORING_FSYNC_DATASYNC);
	ubm_be_sqe_flags(be, sqe);
}

static int file_queue_io(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
			 const struct ubm_req *req)
{
	struct io_uring_sqe *sqe;

	sqe = ubm_queue_sqe(q);
	if (!sqe)
		return -EBUSY;
	switch (req->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE: {
		bool wr = req->op == UBLK_IO_OP_WRITE;

		if (req->buf_index >= 0) {
			/* zero copy: the request's pages, registered at buf_index;
			 * the address is an offset into that buffer */
			void *at = (void *)(uintptr_t)req->buf_off;

			if (wr)
				io_uring_prep_write_fixed(sqe, ubm_be_fd(be), at, req->len,
							  req->offset, req->buf_index);
			else
				io_uring_prep_read_fixed(sqe, ubm_be_fd(be), at, req->len,
							 req->offset, req->buf_index);
		} else if (wr) {
			io_uring_prep_write(sqe, ubm_be_fd(be), req->buf, req->len, req->offset);
		} else {
			io_uring_prep_read(sqe, ubm_be_fd(be), req->buf, req->len, req->offset);
		}
		if (wr && (req->flags & UBLK_IO_F_FUA))
			sqe->rw_flags = RWF_DSYNC;
		ubm_be_sqe_flags(be, sqe);
		break;
	}
	case UBLK_IO_OP_FLUSH:
		prep_sync(be, sqe);
		break;
	case UBLK_IO_OP_DISCARD:
		io_uring_prep_fallocate(sqe, ubm_be_fd(be), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					req->offset, req->len);
		ubm_be_sqe_flags(be, sqe);
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		io_uring_prep_fallocate(sqe, ubm_be_fd(be), zeroes_mode(be, req), req->offset,
					req->len);
		ubm_be_sqe_flags(be, sqe);
		break;
	default:
		return -EOPNOTSUPP;
	}
	q->ios[tag].be_stage[slot] = STAGE_MAIN;
	q->ios[tag].be_bytes[slot] = 0;
	io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_BACKEND, slot));
	return 1;
}

/* Queue the rest of a read or write that transferred only `done` bytes. */
static struct io_uring_sqe *prep_rest(struct ubm_backend *be, struct ubm_queue *q,
				      const struct ubm_req *req, uint32_t done)
{
	struct io_uring_sqe *sqe = ubm_queue_sqe(q);
	bool wr = req->op == UBLK_IO_OP_WRITE;

	if (!sqe)
		return NULL;
	if (req->buf_index >= 0) {
		void *at = (void *)(uintptr_t)(req->buf_off + done);

		if (wr)
			io_uring_prep_write_fixed(sqe, ubm_be_fd(be), at, req->len - done,
						  req->offset + done, req->buf_index);
		else
			io_uring_prep_read_fixed(sqe, ubm_be_fd(be), at, req->len - done,
						 req->offset + done, req->buf_index);
	} else if (wr) {
		io_uring_prep_write(sqe, ubm_be_fd(be), (char *)req->buf + done, req->len - done,
				    req->offset + done);
	} else {
		io_uring_prep_read(sqe, ubm_be_fd(be), (char *)req->buf + done, req->len - done,
				   req->offset + done);
	}
	if (wr && (req->flags & UBLK_IO_F_FUA))
		sqe->rw_flags = RWF_DSYNC;
	ubm_be_sqe_flags(be, sqe);
	return sqe;
}

/* Queue a follow-up operation for the same request; 1 on success. */
static int follow_up(unsigned tag, unsigned slot, struct io_uring_sqe *sqe,
		     int *res)
{
	if (!sqe) {
		*res = -EBUSY;
		return 0;
	}
	io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_BACKEND, slot));
	return 1;
}

static int file_complete(struct ubm_backend *be, struct ubm_queue *q, unsigned tag, unsigned slot,
			 const struct ubm_req *req, int cqe_res, int *res)
{
	uint8_t *stage = &q->ios[tag].be_stage[slot];
	struct io_uring_sqe *sqe;

	if (*stage == STAGE_SYNC) {
		*res = cqe_res < 0 ? cqe_res : (int)req->len;
		return 0;
	}
	switch (req->op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE: {
		uint32_t *done = &q->ios[tag].be_bytes[slot];

		if (cqe_res > 0 && *done + (uint32_t)cqe_res < req->len) {
			/* short: go on with the rest, so a real error (ENOSPC) shows */
			*done += (uint32_t)cqe_res;
			return follow_up(tag, slot, prep_rest(be, q, req, *done), res);
		}
		if (cqe_res == 0)  /* nothing more: the end of a file shorter than the device */
			cqe_res = req->op == UBLK_IO_OP_WRITE ? -ENOSPC : -EIO;
		*res = cqe_res < 0 ? cqe_res : (int)req->len;
		return 0;
	}
	case UBLK_IO_OP_FLUSH:
		*res = cqe_res;
		return 0;
	case UBLK_IO_OP_WRITE_ZEROES:
		if (cqe_res == -EOPNOTSUPP && !be->is_blockdev && !be->no_zero_range) {
			/* e.g. tmpfs: no ZERO_RANGE; punching reads back zeroes too */
			be->no_zero_range = true;
			sqe = ubm_queue_sqe(q);
			if (sqe) {
				io_uring_prep_fallocate(sqe, ubm_be_fd(be),
							FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
							req->offset, req->len);
				ubm_be_sqe_flags(be, sqe);
			}
			return follow_up(tag, slot, sqe, res);
		}
		break;
	case UBLK_IO_OP_DISCARD:
		/* discard is advisory: a block device without it did nothing wrong */
		if (cqe_res == -EOPNOTSUPP && be->is_blockdev)
			cqe_res = 0;
		break;
	}
	if (cqe_res >= 0 && (req->flags & UBLK_IO_F_FUA)) {
		*stage = STAGE_SYNC;
		sqe = ubm_queue_sqe(q);
		if (sqe)
			prep_sync(be, sqe);
		return follow_up(tag, slot, sqe, res);
	}
	*res = cqe_res < 0 ? cqe_res : (int)req->len;
	return 0;
}

static int file_sync_io(struct ubm_backend *be, int op, void *buf, uint32_t len, uint64_t off)
{
	if (op == UBLK_IO_OP_FLUSH)
		return fdatasync(be->fd) < 0 ? -errno : 0;
	if (op != UBLK_IO_OP_READ)
		return -EOPNOTSUPP;
	for (uint32_t done = 0; done < len;) {
		ssize_t n = pread(be->fd, (char *)buf + done, len - done, (off_t)(off + done));

		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (uint32_t)n;
	}
	return 0;
}

static void file_close(struct ubm_backend *be)
{
	if (be->fd >= 0)
		close(be->fd);
	be->fd = -1;
}

const struct ubm_backend_ops ubm_file_backend_ops = {
	.name = "file",
	.open = file_open,
	.queue_io = file_queue_io,
	.complete = file_complete,
	.close = file_close,
	.sync_io = file_sync_io,
};

bool ubm_file_is_hole(int fd, uint64_t off, uint64_t len)
{
	off_t data = lseek(fd, (off_t)off, SEEK_DATA);

	return (data < 0 && errno == ENXIO) || (data >= 0 && (uint64_t)data >= off + len);
}
