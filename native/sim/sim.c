/* SPDX-License-Identifier: MIT */
/*
 * The simulator: one queue fed by the caller instead of the ublk driver.
 * It runs the same request handling (core/queue.c) and backends as a device, so
 * host tests exercise the real per-I/O code without a ublk kernel.
 */
#include <stdlib.h>
#include <string.h>

#include "backends/backends.h"
#include "migrate/migrate.h"

#define UBM_SIM_MAX_IO (256u << 10)  /* like a device's max_io_buf_bytes */

struct ubm_sim {
	struct ubm_target tgt;
	struct ubm_queue q;
	unsigned *done_tag;   /* FIFO of finished tags ... */
	int *done_res;        /* ... and their results */
	unsigned done_head, done_count;
};

static void sim_io_done(struct ubm_queue *q, unsigned tag, int res)
{
	struct ubm_sim *sim = q->sim;
	unsigned slot = (sim->done_head + sim->done_count) % q->depth;

	sim->done_tag[slot] = tag;
	sim->done_res[slot] = res;
	sim->done_count++;
}

UBM_EXPORT int ubm_sim_create(const char *source_path, uint32_t logical_bs, uint32_t direct,
			      uint32_t depth, struct ubm_sim **out)
{
	struct ubm_sim *sim;
	struct ubm_backend *be;
	int ret;

	*out = NULL;
	if (depth < 1 || depth > UBLK_MAX_QUEUE_DEPTH)
		return ubm_fail(EINVAL, "depth must be 1..%d", UBLK_MAX_QUEUE_DEPTH);
	if (logical_bs != 512 && logical_bs != 4096)
		return ubm_fail(EINVAL, "logical block size must be 512 or 4096");
	sim = calloc(1, sizeof(*sim));
	if (!sim)
		return ubm_fail(ENOMEM, "out of memory");
	sim->q.bell_fd = -1;
	ubm_target_init(&sim->tgt, 0);
	be = &sim->tgt.source;
	be->ops = ubm_backend_for(source_path);
	be->file_index = FILE_OF_SLOT(SLOT_SOURCE);
	sim->tgt.queues = &sim->q;
	sim->tgt.nr_queues = 1;
	be->logical_bs = logical_bs;
	be->direct = direct;
	sim->tgt.source_path = strdup(source_path);
	sim->tgt.max_io = UBM_SIM_MAX_IO;
	ret = be->ops->open(be, source_path);
	if (ret < 0)
		goto fail;
	sim->q.tgt = &sim->tgt;
	sim->q.depth = depth;
	sim->q.path = UBM_PATH_COPY;
	sim->q.io_done = sim_io_done;
	sim->q.sim = sim;
	sim->q.ios = calloc(depth, sizeof(*sim->q.ios));
	sim->done_tag = calloc(depth, sizeof(*sim->done_tag));
	sim->done_res = calloc(depth, sizeof(*sim->done_res));
	if (!sim->q.ios || !sim->done_tag || !sim->done_res) {
		ret = ubm_fail(ENOMEM, "out of memory");
		goto fail;
	}
	ret = ubm_queue_ring_init(&sim->q, depth * 4, -1, false, false);
	if (ret == 0 && be->ops->attach)  /* NBD: the queue's connection */
		ret = be->ops->attach(be, &sim->q, SLOT_SOURCE);
	if (ret < 0)
		goto fail;
	*out = sim;
	return 0;
fail:
	ubm_sim_destroy(sim);
	return ret;
}

UBM_EXPORT int ubm_sim_submit(struct ubm_sim *sim, uint32_t op, uint32_t flags, uint64_t offset,
			      uint32_t len, void *buf)
{
	struct ubm_queue *q = &sim->q;
	const struct ubm_backend *be = &sim->tgt.source;
	unsigned tag;

	if ((offset | len) % be->logical_bs || offset + len > be->size || len > UBM_SIM_MAX_IO ||
	    (len == 0 && op != UBLK_IO_OP_FLUSH))
		return ubm_fail(EINVAL, "request outside the device or not block aligned");
	for (tag = 0; tag < q->depth; tag++) {
		if (q->ios[tag].state == IO_IDLE)
			break;
	}
	if (tag == q->depth)
		return ubm_fail(EBUSY, "all %u tags are in flight", q->depth);
	q->ios[tag].req = (struct ubm_req){
		.op = (uint8_t)op, .flags = flags, .offset = offset, .len = len, .buf = buf,
		.buf_index = -1,
	};
	ubm_queue_start_io(q, tag);
	io_uring_submit(&q->ring);
	return (int)tag;
}

UBM_EXPORT int ubm_sim_wait(struct ubm_sim *sim, int *ticket, int *result)
{
	struct ubm_queue *q = &sim->q;
	int ret;

	while (sim->done_count == 0) {
		if (q->ios_inflight == 0)
			return -EAGAIN;
		ret = io_uring_submit_and_wait(&q->ring, 1);
		if (ret < 0 && ret != -EINTR)
			return ubm_fail(ret, "io_uring_enter: %s", strerror(-ret));
		ubm_queue_reap(q);
	}
	*ticket = (int)sim->done_tag[sim->done_head];
	*result = sim->done_res[sim->done_head];
	q->ios[*ticket].state = IO_IDLE;
	sim->done_head = (sim->done_head + 1) % q->depth;
	sim->done_count--;
	return 0;
}

UBM_EXPORT struct ubm_target *ubm_sim_target(struct ubm_sim *sim)
{
	return &sim->tgt;
}

UBM_EXPORT int ubm_sim_poll(struct ubm_sim *sim)
{
	int ret = io_uring_submit(&sim->q.ring);

	if (ret < 0)
		return ubm_fail(ret, "io_uring_submit: %s", strerror(-ret));
	return ubm_queue_reap(&sim->q);
}

UBM_EXPORT int ubm_sim_set_wait(struct ubm_sim *sim, uint32_t ms)
{
	sim->tgt.wait_ns = (ms ? ms : UBM_DEFAULT_WAIT_MS) * 1000000ull;
	return 0;
}

UBM_EXPORT int ubm_sim_set_delay(struct ubm_sim *sim, uint32_t slot, uint64_t ns)
{
	struct ubm_backend *be = slot < UBM_MAX_BACKENDS ? sim->tgt.be[slot] : NULL;

	if (!be)
		return ubm_fail(EINVAL, "no backend in slot %u", slot);
	return ubm_backend_set_delay(be, ns);
}

UBM_EXPORT uint64_t ubm_sim_size(const struct ubm_sim *sim)
{
	return sim->tgt.source.size;
}

UBM_EXPORT void ubm_sim_stats(const struct ubm_sim *sim, struct ubm_stats *out)
{
	memset(out, 0, sizeof(*out));
	ubm_stats_add(out, &sim->q.stats);
	ubm_target_stats(&sim->tgt, out);
}

UBM_EXPORT void ubm_sim_destroy(struct ubm_sim *sim)
{
	if (!sim)
		return;
	/* drain what is still in flight so no CQE outlives its buffer (a request
	 * waiting for a lost connection fails now) */
	if (sim->q.ring_ok)
		ubm_queue_give_up(&sim->q);
	while (sim->q.ring_ok && sim->q.ios_inflight) {
		if (io_uring_submit_and_wait(&sim->q.ring, 1) < 0)
			break;
		ubm_queue_reap(&sim->q);
	}
	if (sim->tgt.router)
		ubm_mig_finish(&sim->tgt);
	ubm_queue_ring_exit(&sim->q);
	ubm_target_fini(&sim->tgt);
	free(sim->tgt.source_path);
	free(sim->q.ios);
	free(sim->done_tag);
	free(sim->done_res);
	free(sim);
}
