/* SPDX-License-Identifier: MIT */
/*
 * Native test of the copier's pacer (migrate/pacer.c) on a simulated clock:
 * a guest that completes requests at a steady rate while the copier rests,
 * and at a fraction of it while a burst runs.  Whatever that fraction, the
 * guest keeps about GUEST_SHARE of its rate or the copier rests as long as it
 * may (its floor, so a migration converges); a copier that costs the guest
 * nothing hardly rests.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "migrate/migrate.h"
#include "tests/helpers.h"

#define NS_PER_MS 1000000ull

struct outcome {
	double guest_kept;   /* the guest's completions against a run without a copier */
	double copier_busy;  /* the copier's share of the time */
	unsigned full_bursts; /* bursts that took every slot */
};

/* 10 simulated seconds: bursts of burst_ms; the guest completes `rate` requests
 * a ms while the copier rests, slowed to share x that while it copies. */
static struct outcome simulate(double share, double burst_ms, double rate)
{
	struct ubm_migration *m = calloc(1, sizeof(*m));
	uint64_t now = 0, end = 10000 * NS_PER_MS, dt = NS_PER_MS / 20, burst_end = 0;
	uint64_t busy_ns = 0;
	unsigned busy = 0, full_bursts = 0;
	double done = 0;
	struct outcome o;

	CHECK(m, "out of memory");
	m->copy_depth = 4;
	m->busy_depth = 1;
	m->inflight = 32;
	for (; now < end; now += dt) {
		unsigned limit = mig_pace(m, busy, now, (uint64_t)done);

		CHECK(limit <= m->busy_depth || m->pacer.guest_share >= 0.9,
		      "a full burst, but the guest noticed the copier (%.2f)", m->pacer.guest_share);
		full_bursts += !busy && limit == m->copy_depth;
		if (!busy && limit)
			busy = 1, burst_end = now + (uint64_t)(burst_ms * NS_PER_MS);
		done += (busy ? share : 1.0) * rate * ((double)dt / NS_PER_MS);
		if (busy) {
			busy_ns += dt;
			if (now + dt >= burst_end)
				busy = 0;
		}
	}
	o.guest_kept = done / (rate * ((double)end / NS_PER_MS));
	o.copier_busy = (double)busy_ns / (double)end;
	o.full_bursts = full_bursts;
	free(m);
	return o;
}

int main(void)
{
	struct ubm_migration m;

	/* an idle guest, or --no-yield: every slot */
	memset(&m, 0, sizeof(m));
	m.copy_depth = 4;
	m.busy_depth = 1;
	CHECK(mig_pace(&m, 0, 1, 0) == 4, "an idle guest leaves the copier every slot");
	m.inflight = 1;
	m.busy_depth = 4;
	CHECK(mig_pace(&m, 0, 1, 0) == 4, "--no-yield: every slot");

	for (double share = 0; share <= 1.0; share += 0.1) {
		for (double burst = 2; burst <= 20; burst *= 3) {
			struct outcome o = simulate(share, burst, 10);

			printf("test_pacer: guest at %.1f of its rate in bursts of %4.1f ms: keeps %.2f, "
			       "copier busy %.2f\n", share, burst, o.guest_kept, o.copier_busy);
			/* the floor: the copier is busy 1 / (1 + REST_MAX) of the time at least */
			CHECK(o.copier_busy >= 0.23, "the copier starved (%.2f)", o.copier_busy);
			/* the guest keeps GUEST_SHARE (0.75), or the copier is at its floor */
			CHECK(o.guest_kept >= 0.70 || o.copier_busy <= 0.27,
			      "the guest kept %.2f with the copier busy %.2f", o.guest_kept,
			      o.copier_busy);
			/* a copier the guest does not notice hardly rests */
			if (share >= 0.95)
				CHECK(o.copier_busy >= 0.85 && o.full_bursts > 0,
				      "an unnoticed copier rested (%.2f busy, %u full bursts)",
				      o.copier_busy, o.full_bursts);
			else if (share <= 0.85)
				CHECK(o.full_bursts == 0, "%u full bursts", o.full_bursts);
		}
	}
	printf("test_pacer: ok\n");
	return 0;
}
