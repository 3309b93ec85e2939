/* SPDX-License-Identifier: MIT */
/*
 * A target: the backends a device's (or a simulator's) requests go to, by
 * slot, and the queues routing to it.  Its set-up and end, and what other
 * threads ask of all its queues at once.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/core.h"

void ubm_target_init(struct ubm_target *t, uint32_t wait_ms)
{
	memset(t, 0, sizeof(*t));
	t->source.fd = -1;
	t->dest.fd = -1;
	t->be[SLOT_SOURCE] = &t->source;
	t->primary = SLOT_SOURCE;
	t->wait_ns = (uint64_t)(wait_ms ? wait_ms : UBM_DEFAULT_WAIT_MS) * 1000000ull;
	pthread_mutex_init(&t->router_lock, NULL);
}

/* The backends close (with no request in flight, no router). */
void ubm_target_fini(struct ubm_target *t)
{
	if (t->dest.ops && t->dest.fd >= 0)
		t->dest.ops->close(&t->dest);
	if (t->source.ops)
		t->source.ops->close(&t->source);
	pthread_mutex_destroy(&t->router_lock);
}

void ubm_target_ring_bells(struct ubm_target *t, uint32_t actions)
{
	for (unsigned i = 0; i < t->nr_queues; i++)
		ubm_queue_ring_bell(&t->queues[i], actions);
}

/*
 * Wait until every queue thread has passed through its doorbell handler
 * after this call: from then on none still acts on what the caller changed
 * before calling.  A simulator queue is driven by the caller itself.
 */
int ubm_target_sync(struct ubm_target *t)
{
	uint32_t want[UBM_MAX_QUEUES];

	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		if (!q->dev)
			continue;
		want[i] = __atomic_load_n(&q->acked, __ATOMIC_ACQUIRE) + 1;
		ubm_queue_ring_bell(q, ACT_SYNC);
	}
	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		while (q->dev && !q->stopping &&
		       (int32_t)(__atomic_load_n(&q->acked, __ATOMIC_ACQUIRE) - want[i]) < 0)
			usleep(100);
	}
	return 0;
}

/* Install fd (or with -1, nothing) for backend `slot` in every queue's ring. */
int ubm_target_set_file(struct ubm_target *t, unsigned slot, int fd)
{
	int ret = 0;

	__atomic_store_n(&t->files[FILE_OF_SLOT(slot)], fd, __ATOMIC_RELEASE);
	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		if (q->dev)
			ubm_queue_ring_bell(q, ACT_FILES);
		else if (ret == 0)  /* simulator: the caller's ring */
			ret = ubm_queue_set_file(q, FILE_OF_SLOT(slot), fd);
	}
	if (ret == 0)
		ret = ubm_target_sync(t);  /* ACT_FILES is handled before the ACT_SYNC ack */
	return ret;
}

UBM_EXPORT int ubm_reconnect(struct ubm_target *t)
{
	struct ubm_backend *be = t->be[t->primary];
	int ret;

	if (!be->ops->reconnect)
		return ubm_fail(EOPNOTSUPP, "the device serves a %s: it has no connections to "
				"restore", be->ops->name);
	ret = be->ops->reconnect(be);
	if (ret < 0)
		return ret;
	ubm_target_conn_back(t);
	return 0;
}

void ubm_target_stats(const struct ubm_target *t, struct ubm_stats *out)
{
	struct ubm_backend *be = t->be[__atomic_load_n(&t->primary, __ATOMIC_ACQUIRE)];

	out->conn_down = be && be->ops->down ? be->ops->down(be) : 0;
}

uint64_t ubm_target_completed(const struct ubm_target *t)
{
	struct ubm_stats s = { 0 };

	for (unsigned i = 0; i < t->nr_queues; i++)
		ubm_stats_add(&s, &t->queues[i].stats);
	return s.reads + s.writes + s.flushes + s.discards + s.write_zeroes + s.errors;
}

void ubm_target_conn_back(struct ubm_target *t)
{
	for (unsigned i = 0; i < t->nr_queues; i++) {
		struct ubm_queue *q = &t->queues[i];

		if (q->dev)
			ubm_queue_ring_bell(q, ACT_RETRY_CONN);
		else  /* a simulator: its caller's thread is this one */
			ubm_queue_retry_waiting(q);
	}
}
