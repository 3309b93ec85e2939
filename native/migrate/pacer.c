/* SPDX-License-Identifier: MIT */
/*
 * The copier's share while the guest is busy: a closed loop on what the copy
 * costs the guest, measured on the guest itself.
 *
 * While guest requests are in flight the copier works in bursts (at most
 * busy_depth chunks, taken together, until all are done), each followed by a
 * rest.  The guest's completion rate during the rests is its rate with the
 * copier out of the way, measured again all the time (no baseline taken
 * before the migration, which a changing load would make stale); its rate
 * during the bursts, against that, is the share s the copier leaves it while
 * copying.  A rest of R times the burst's length leaves the guest
 *
 *     (R + s) / (R + 1)
 *
 * of its rate, so R = (GUEST_SHARE - s) / (1 - GUEST_SHARE) keeps it at
 * GUEST_SHARE: a copier that costs the guest nothing (a light or throttled
 * load, or spare CPU) rests little, one that starves it rests long.  R is kept
 * within [REST_MIN, REST_MAX]: the copier still gets 1 / (1 + REST_MAX) of the
 * time whatever the guest does, so a migration always converges, and the
 * short rests go on measuring.
 *
 * A burst is busy_depth chunks, or every copy slot while the last measure
 * says the guest hardly notices the copier (UNNOTICED): a destination that is
 * slow to answer, but costs the guest nothing, is not then written one chunk
 * at a time.
 *
 * The rates are sums over the recent phases (each cycle's weight DECAY times
 * the one before), by time, so short and long phases count for what they
 * last.  The guest's completions are the queues' own counters (the core's,
 * ubm_target_completed), read by the copier: nothing is added to a guest
 * request's path.  An idle guest (nothing in flight) lets the copier take
 * every slot.
 * The copier thread alone calls these.
 */
#include "migrate/migrate.h"

#define GUEST_SHARE 0.75   /* of its rate the guest keeps while the copier runs */
#define REST_MIN 0.1
#define REST_MAX 3.0
#define REST_FIRST 1.0     /* before anything was measured */
#define DECAY 0.85
#define UNNOTICED 0.9      /* a guest this fast in bursts: the next takes every slot */

/* A phase ended at now: add it to the sums of its kind. */
static void pace_add(struct mig_pacer *p, double *ns, double *done, uint64_t now, uint64_t guest)
{
	*ns += (double)(now - p->t0);
	*done += (double)(guest - p->done0);
}

/* A burst ended: the next rest's ratio from what the sums say. */
static void pace_plan(struct mig_pacer *p)
{
	double s, r;

	if (p->rest_ns <= 0 || p->rest_done <= 0 || p->burst_ns <= 0) {
		p->rest_ratio = REST_FIRST;  /* (guest_share stays 0: bursts of busy_depth) */
		return;
	}
	s = (p->burst_done / p->burst_ns) / (p->rest_done / p->rest_ns);
	if (s > 1)
		s = 1;
	r = (GUEST_SHARE - s) / (1 - GUEST_SHARE);
	p->rest_ratio = r < REST_MIN ? REST_MIN : r > REST_MAX ? REST_MAX : r;
	p->guest_share = s;
	p->burst_ns *= DECAY;
	p->burst_done *= DECAY;
	p->rest_ns *= DECAY;
	p->rest_done *= DECAY;
}

/* Chunks a burst starting now takes. */
static unsigned pace_burst(const struct ubm_migration *m)
{
	return m->pacer.guest_share >= UNNOTICED ? m->copy_depth : m->busy_depth;
}

/* The next phase starts at now. */
static void pace_enter(struct mig_pacer *p, int phase, uint64_t now, uint64_t guest)
{
	p->phase = phase;
	p->t0 = now;
	p->done0 = guest;
}

unsigned mig_pace(struct ubm_migration *m, unsigned busy, uint64_t now, uint64_t guest)
{
	struct mig_pacer *p = &m->pacer;

	if (m->busy_depth >= m->copy_depth)
		return m->copy_depth;  /* --no-yield */
	if (!A_LOAD(&m->inflight)) {
		p->phase = PACE_FREE;  /* an idle guest: every slot */
		return m->copy_depth;
	}
	switch (p->phase) {
	case PACE_FREE:
		/* the guest got busy: a burst begins (or the chunks in flight are one) */
		pace_enter(p, PACE_BURST, now, guest);
		return busy ? 0 : pace_burst(m);
	case PACE_BURST:
		if (busy)
			return 0;  /* the burst's chunks are not all done */
		pace_add(p, &p->burst_ns, &p->burst_done, now, guest);
		pace_plan(p);
		p->rest_until = now + (uint64_t)(p->rest_ratio * (double)(now - p->t0));
		pace_enter(p, PACE_REST, now, guest);
		/* fall through */
	case PACE_REST:
		if (now < p->rest_until)
			return 0;
		pace_add(p, &p->rest_ns, &p->rest_done, now, guest);
		pace_enter(p, PACE_BURST, now, guest);
		return pace_burst(m);
	}
	return 0;
}

uint64_t mig_pace_rest_left(const struct ubm_migration *m, uint64_t now)
{
	return m->pacer.phase == PACE_REST && now < m->pacer.rest_until ? m->pacer.rest_until - now
									  : 0;
}
