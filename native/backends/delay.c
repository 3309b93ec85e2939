/* SPDX-License-Identifier: MIT */
/*
 * Tests: a backend wrapping another, holding every write, discard,
 * write-zeroes and flush for a while before the wrapped backend gets it (a
 * timeout linked ahead of its SQE), to widen race windows
 * (ubm_sim_set_delay).  It is a fault of its own, in the shape of the kernel
 * selftest server's fault_inject target, not a field of the real backends.
 * It wraps a file backend, whose operations are one SQE each on the ring.
 */
#include <stdlib.h>

#include "backends/backends.h"

struct delay_backend {
	struct ubm_backend_ops ops;  /* be->ops points here: the wrapped one's, but two */
	const struct ubm_backend_ops *inner;
	struct __kernel_timespec delay;
};

static struct delay_backend *delay_of(const struct ubm_backend *be)
{
	return (struct delay_backend *)be->ops;  /* (ops is the first member) */
}

static int delay_queue_io(struct ubm_backend *be, struct ubm_queue *q, unsigned tag,
			  unsigned slot, const struct ubm_req *req)
{
	struct delay_backend *d = delay_of(be);
	struct io_uring_sqe *sqe;

	if (req->op != UBLK_IO_OP_READ) {
		/* the timeout and the operation in one submission: a link
		 * split across two would not hold the operation back */
		if (io_uring_sq_space_left(&q->ring) < 2)
			io_uring_submit(&q->ring);
		sqe = ubm_queue_sqe(q);
		if (!sqe)
			return -EBUSY;
		io_uring_prep_timeout(sqe, &d->delay, 0, IORING_TIMEOUT_ETIME_SUCCESS);
		sqe->flags |= IOSQE_IO_LINK;
		io_uring_sqe_set_data64(sqe, ubm_ud(tag, UD_IGNORE, slot));
	}
	return d->inner->queue_io(be, q, tag, slot, req);
}

static void delay_close(struct ubm_backend *be)
{
	struct delay_backend *d = delay_of(be);

	be->ops = d->inner;
	free(d);
	be->ops->close(be);
}

int ubm_backend_set_delay(struct ubm_backend *be, uint64_t ns)
{
	struct delay_backend *d;

	if (be->ops->queue_io == delay_queue_io) {
		d = delay_of(be);
	} else {
		if (!ns)
			return 0;
		if (!ubm_backend_is_file(be))
			return ubm_fail(EINVAL, "only a file backend can be delayed, not %s",
					be->ops->name);
		d = calloc(1, sizeof(*d));
		if (!d)
			return ubm_fail(ENOMEM, "out of memory");
		d->inner = be->ops;
		d->ops = *be->ops;
		d->ops.queue_io = delay_queue_io;
		d->ops.close = delay_close;
		be->ops = &d->ops;
	}
	d->delay.tv_sec = (long long)(ns / 1000000000u);
	d->delay.tv_nsec = (long long)(ns % 1000000000u);
	return 0;
}
