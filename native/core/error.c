/* SPDX-License-Identifier: MIT */
/* The text of the last failure, per thread (ubm_last_error). */
#include <stdarg.h>
#include <stdio.h>

#include "core/core.h"

static __thread char last_error[512];

int ubm_fail(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	return err > 0 ? -err : err;
}

UBM_EXPORT const char *ubm_last_error(void)
{
	return last_error;
}
