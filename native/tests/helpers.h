/* SPDX-License-Identifier: MIT */
/*
 * What the native tests share (as liburing's test/helpers.h): a check that
 * ends the test with a message, seeded random numbers, temporary files, and
 * a guest doing I/O through the simulator against an in-memory model of the
 * disk.  Each test program links helpers.c (native/Makefile).
 */
#ifndef UBM_TEST_HELPERS_H
#define UBM_TEST_HELPERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ubm.h"

/* ---- checks -------------------------------------------------------------------------- */

/* Print "file:line: " and the message, and exit(1). */
void t_die(const char *file, int line, const char *fmt, ...)
	__attribute__((noreturn, format(printf, 3, 4)));

/* CHECK(condition, printf-style message): the test fails unless it holds. */
#define CHECK(c, ...) do { if (!(c)) t_die(__FILE__, __LINE__, __VA_ARGS__); } while (0)

/* ---- random numbers (random(), seeded by the test with srandom()) -------------------- */

/* In [0, n). */
uint64_t t_rnd(uint64_t n);
/* len random bytes. */
void t_fill_random(unsigned char *buf, size_t len);

/* ---- files ----------------------------------------------------------------------------- */

#define T_PATH_MAX 4096

/* $TMPDIR, else /tmp (make test runs each test on ext4 and on tmpfs). */
const char *t_tmpdir(void);
/* A new file $TMPDIR/name-XXXXXX of size bytes (a hole), its name in path;
 * returns it open for reading and writing. */
int t_create_file(char path[T_PATH_MAX], const char *name, uint64_t size);
/* The first size bytes of the file (malloc'ed: the caller frees them). */
unsigned char *t_read_file(const char *path, uint64_t size);
/* The file must hold exactly model's size bytes; what names it in the failure. */
void t_check_file(const char *path, const unsigned char *model, uint64_t size,
		  const char *what);

/* ---- a guest: requests through the simulator, against a model of the disk ------------- */

#define T_DEPTH_MAX 64

struct t_slot {
	int used;
	uint32_t op;
	uint64_t off;
	uint32_t len;
	unsigned char *buf;
};

struct t_guest {
	struct ubm_sim *sim;
	unsigned char *model;  /* what the disk holds once every request so far is done */
	uint64_t size;
	int depth;             /* the simulator's: tickets are in [0, depth) */
	int inflight;
	struct t_slot slots[T_DEPTH_MAX];  /* by ticket */
};

/* Nothing in flight yet. */
void t_guest_init(struct t_guest *g, struct ubm_sim *sim, unsigned char *model, uint64_t size,
		  int depth);
/* Whether [off, off + len) overlaps a request in flight: the block layer
 * never has overlapping requests in flight together, so a test must not. */
bool t_guest_overlaps(const struct t_guest *g, uint64_t off, uint32_t len);
/* Submit a request (a write's data random; a flush has no range) and apply
 * it to the model; returns its ticket. */
int t_guest_submit(struct t_guest *g, uint32_t op, uint32_t flags, uint64_t off, uint32_t len);
/* Wait for one completion: its result must be the request's length, and a
 * read's data must equal the model's. */
void t_guest_reap(struct t_guest *g);
/* Reap until nothing is in flight. */
void t_guest_drain(struct t_guest *g);

#endif
