/* SPDX-License-Identifier: MIT */
/*
 * A ublk device: its lifecycle (ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV,
 * DEL_DEV) and its recovery (a dead server's device taken over); its queues
 * are in queue.c.
 */
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backends/backends.h"
#include "migrate/migrate.h"
#include "ublk/ublk.h"

#define DEFAULT_MAX_IO_BYTES (512u << 10)
/* A device outlives its server (its I/O waits, and what the server held is
 * issued again to the next one) when the driver offers it. */
#define RECOVERY_FLAGS (UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE)
/* START_USER_RECOVERY answers EBUSY until the driver has noticed the old
 * server's end (its files released, its requests requeued): retry this long */
#define RECOVERY_WAIT_MS 10000
/* ---- lifecycle ------------------------------------------------------------ */

static int check_config(const struct ubm_config *cfg)
{
	if (!cfg->source_path || !*cfg->source_path)
		return ubm_fail(EINVAL, "no image given");
	if (cfg->nr_queues < 1 || cfg->nr_queues > UBM_MAX_QUEUES)
		return ubm_fail(EINVAL, "queues must be 1..%d", UBM_MAX_QUEUES);
	if (cfg->queue_depth < 1 || cfg->queue_depth > UBLK_MAX_QUEUE_DEPTH)
		return ubm_fail(EINVAL, "queue depth must be 1..%d", UBLK_MAX_QUEUE_DEPTH);
	if (cfg->logical_bs != 512 && cfg->logical_bs != 4096)
		return ubm_fail(EINVAL, "logical block size must be 512 or 4096");
	if (cfg->max_io_bytes && (cfg->max_io_bytes % 4096 || cfg->max_io_bytes > (32u << 20)))
		return ubm_fail(EINVAL, "max I/O size must be a multiple of 4096, at most 32 MiB");
	if (cfg->data_path > UBM_PATH_COPY)
		return ubm_fail(EINVAL, "unknown data path %u", cfg->data_path);
	return 0;
}

static int open_source(struct ubm_dev *dev)
{
	struct ubm_backend *be = &dev->tgt.source;
	int ret;

	be->ops = ubm_backend_for(dev->cfg.source_path);
	be->fd = -1;
	be->file_index = FILE_OF_SLOT(SLOT_SOURCE);
	be->logical_bs = dev->cfg.logical_bs;
	be->read_only = dev->cfg.read_only;
	be->direct = dev->cfg.direct;
	be->via_fd = dev->cfg.source_fd;
	be->timeout_ms = dev->cfg.timeout_ms;
	ret = be->ops->open(be, dev->cfg.source_path);
	if (ret < 0)
		return ret;
	if (be->size == 0)
		return ubm_fail(EINVAL, "%s: the image is empty", dev->cfg.source_path);
	if (be->size % be->logical_bs)
		return ubm_fail(EINVAL, "%s: size %llu is not a multiple of the logical block size %u",
				dev->cfg.source_path, (unsigned long long)be->size, be->logical_bs);
	return 0;
}

static uint64_t path_flags(int path)
{
	switch (path) {
	case UBM_PATH_AUTO_ZC: return UBLK_F_AUTO_BUF_REG;
	case UBM_PATH_ZC: return UBLK_F_SUPPORT_ZERO_COPY;
	}
	return 0;
}

static void set_params(struct ubm_dev *dev)
{
	struct ublk_params *p = &dev->params;
	const struct ubm_backend *be = &dev->tgt.source;
	unsigned shift = __builtin_ctz(be->logical_bs);

	memset(p, 0, sizeof(*p));
	p->len = sizeof(*p);
	p->types = UBLK_PARAM_TYPE_BASIC;
	/* writes are volatile until a flush (page cache, or the disk's cache
	 * under O_DIRECT); FUA is honoured per write */
	p->basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA |
		(be->read_only ? UBLK_ATTR_READ_ONLY : 0);
	p->basic.logical_bs_shift = shift;
	p->basic.physical_bs_shift = shift > 12 ? shift : 12;
	p->basic.io_min_shift = shift;
	p->basic.io_opt_shift = 12;
	p->basic.max_sectors = dev->info.max_io_buf_bytes >> 9;
	p->basic.dev_sectors = be->size >> 9;
	if (be->can_discard) {
		p->types |= UBLK_PARAM_TYPE_DISCARD;
		p->discard.discard_granularity = 4096 > be->logical_bs ? 4096 : be->logical_bs;
		p->discard.max_discard_sectors = 1u << 21;       /* 1 GiB a request */
		p->discard.max_write_zeroes_sectors = 1u << 21;
		p->discard.max_discard_segments = 1;
	}
}

static int open_cdev(struct ubm_dev *dev)
{
	char path[64];
	int i;

	snprintf(path, sizeof(path), "/dev/ublkc%u", dev->info.dev_id);
	/* devtmpfs creates the node as ADD_DEV returns; without udev it may
	 * take a moment to become openable */
	for (i = 0; i < 300; i++) {
		dev->cdev_fd = open(path, O_RDWR | O_CLOEXEC);
		if (dev->cdev_fd >= 0)
			return 0;
		if (errno != ENOENT)
			break;
		usleep(10000);
	}
	return ubm_fail(errno, "cannot open %s: %s", path, strerror(errno));
}

static bool pid_alive(int pid)
{
	return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

/* GET_DEV_INFO of an existing device (-ENOENT: none with that id). */
static int dev_info(struct ubm_ctrl *c, uint32_t id, struct ublksrv_ctrl_dev_info *info)
{
	int ret;

	memset(info, 0, sizeof(*info));
	ret = ubm_ctrl_cmd(c, UBLK_U_CMD_GET_DEV_INFO, id, info, sizeof(*info), 0);
	if (ret == -ENODEV || ret == -ENOENT)
		return ubm_fail(ENOENT, "there is no ublk device %u", id);
	if (ret < 0)
		return ubm_fail(ret, "GET_DEV_INFO of device %u failed: %s", id, strerror(-ret));
	return 0;
}

/* Whether device id's server is gone, so another may take the device over. */
static int check_orphan(const struct ublksrv_ctrl_dev_info *info, uint32_t id)
{
	if (!(info->flags & UBLK_F_USER_RECOVERY))
		return ubm_fail(EINVAL, "/dev/ublkb%u was added without UBLK_F_USER_RECOVERY: it "
				"cannot outlive its server", id);
	if (info->state == UBLK_S_DEV_DEAD)  /* added, never started: its server may be starting */
		return ubm_fail(EBUSY, "/dev/ublkb%u was never started", id);
	if (info->state == UBLK_S_DEV_LIVE && pid_alive(info->ublksrv_pid))
		return ubm_fail(EBUSY, "/dev/ublkb%u is served by a live process (pid %d)", id,
				info->ublksrv_pid);
	return 0;  /* quiesced (or about to be: its server's files are being released) */
}

/* Recovery, before the queues: the device's geometry replaces the config's,
 * the source must be its size, and START_USER_RECOVERY must take. */
static int recover_begin(struct ubm_dev *dev)
{
	uint32_t id = dev->info.dev_id;
	struct ublk_params *p = &dev->params;
	int ret, waited;

	ret = dev_info(&dev->ctrl, id, &dev->info);
	if (ret < 0)
		return ret;
	ret = check_orphan(&dev->info, id);
	if (ret < 0)
		return ret;
	memset(p, 0, sizeof(*p));
	p->len = sizeof(*p);
	ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_GET_PARAMS, id, p, sizeof(*p), 0);
	if (ret < 0)
		return ubm_fail(ret, "GET_PARAMS of device %u failed: %s", id, strerror(-ret));
	dev->cfg.nr_queues = dev->info.nr_hw_queues;
	dev->cfg.queue_depth = dev->info.queue_depth;
	dev->cfg.max_io_bytes = dev->info.max_io_buf_bytes;
	dev->cfg.logical_bs = 1u << p->basic.logical_bs_shift;
	dev->cfg.read_only = !!(p->basic.attrs & UBLK_ATTR_READ_ONLY);
	dev->path = ubm_choose_path(dev->info.flags);  /* (the same bits as the features) */
	ret = open_source(dev);
	if (ret < 0)
		return ret;
	/* a migration's destination may be larger than the device (allowed): the
	 * device keeps its size, and serves that much of the image */
	if (dev->tgt.source.size < (uint64_t)p->basic.dev_sectors << 9)
		return ubm_fail(EINVAL, "%s holds %llu bytes but /dev/ublkb%u has %llu: not the "
				"image it served", dev->cfg.source_path,
				(unsigned long long)dev->tgt.source.size, id,
				(unsigned long long)p->basic.dev_sectors << 9);
	dev->tgt.source.size = (uint64_t)p->basic.dev_sectors << 9;
	for (waited = 0;; waited += 20) {
		ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_START_USER_RECOVERY, id, NULL, 0, 0);
		if (ret != -EBUSY || waited >= RECOVERY_WAIT_MS)
			break;
		usleep(20000);
	}
	if (ret < 0)
		return ubm_fail(ret, "START_USER_RECOVERY of device %u failed: %s%s", id,
				strerror(-ret), ret == -EBUSY ? " (its old server has not let go)" : "");
	dev->recovering = true;
	return 0;
}

/* A new device: ADD_DEV and SET_PARAMS. */
static int add_device(struct ubm_dev *dev)
{
	const struct ubm_config *cfg = &dev->cfg;
	uint64_t features;
	int ret;

	ret = open_source(dev);
	if (ret < 0)
		return ret;
	ret = ubm_get_features(&features);
	if (ret < 0)
		return ret;
	dev->path = cfg->data_path == UBM_PATH_AUTO ? ubm_choose_path(features) : (int)cfg->data_path;
	if ((path_flags(dev->path) & features) != path_flags(dev->path))
		return ubm_fail(EOPNOTSUPP, "this kernel's ublk driver does not offer the %s data path",
				ubm_path_name(dev->path));

	ret = ubm_ctrl_open(&dev->ctrl);
	if (ret < 0)
		return ret;
	dev->info.nr_hw_queues = cfg->nr_queues;
	dev->info.queue_depth = cfg->queue_depth;
	dev->info.max_io_buf_bytes = cfg->max_io_bytes ? cfg->max_io_bytes : DEFAULT_MAX_IO_BYTES;
	dev->info.dev_id = cfg->dev_id < 0 ? (uint32_t)-1 : (uint32_t)cfg->dev_id;
	dev->info.flags = UBLK_F_CMD_IOCTL_ENCODE | path_flags(dev->path) |
		(features & RECOVERY_FLAGS);
	ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_ADD_DEV, dev->info.dev_id, &dev->info,
			   sizeof(dev->info), 0);
	if (ret < 0)
		return ubm_fail(ret, "ADD_DEV failed: %s", strerror(-ret));
	dev->added = true;

	set_params(dev);
	ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_SET_PARAMS, dev->info.dev_id, &dev->params,
			   sizeof(dev->params), 0);
	if (ret < 0)
		return ubm_fail(ret, "SET_PARAMS failed: %s", strerror(-ret));
	return 0;
}

UBM_EXPORT int ubm_dev_remove_orphan(uint32_t id)
{
	struct ublksrv_ctrl_dev_info info;
	struct ubm_ctrl c;
	int ret;

	ret = ubm_ctrl_open(&c);
	if (ret < 0)
		return ret;
	ret = dev_info(&c, id, &info);
	if (ret == 0)
		ret = check_orphan(&info, id);
	if (ret == 0) {
		/* STOP_DEV fails what the device held and removes the disk */
		ret = ubm_ctrl_cmd(&c, UBLK_U_CMD_STOP_DEV, id, NULL, 0, 0);
		if (ret < 0)
			ubm_fail(ret, "STOP_DEV of device %u failed: %s", id, strerror(-ret));
	}
	if (ret == 0) {
		ret = ubm_ctrl_cmd(&c, UBLK_U_CMD_DEL_DEV, id, NULL, 0, 0);
		if (ret < 0)
			ubm_fail(ret, "DEL_DEV of device %u failed: %s", id, strerror(-ret));
	}
	ubm_ctrl_close(&c);
	return ret;
}

UBM_EXPORT int ubm_dev_create(const struct ubm_config *cfg, struct ubm_dev **out)
{
	struct ubm_dev *dev;
	unsigned i;
	int ret;

	*out = NULL;
	ret = check_config(cfg);
	if (ret < 0)
		return ret;
	dev = calloc(1, sizeof(*dev));
	if (!dev)
		return ubm_fail(ENOMEM, "out of memory");
	dev->cfg = *cfg;
	dev->cfg.source_path = strdup(cfg->source_path);
	ubm_target_init(&dev->tgt, cfg->wait_ms);
	dev->tgt.source_path = (char *)dev->cfg.source_path;
	dev->cdev_fd = dev->ctrl.fd = -1;
	sem_init(&dev->ready, 0, 0);
	*out = dev;  /* ubm_dev_destroy() cleans up whatever was set up */

	if (cfg->recover) {
		if (cfg->dev_id < 0)
			return ubm_fail(EINVAL, "recovering needs the device's id");
		ret = ubm_ctrl_open(&dev->ctrl);
		if (ret < 0)
			return ret;
		dev->info.dev_id = (uint32_t)cfg->dev_id;
		ret = recover_begin(dev);
		if (ret < 0)
			return ret;
	} else {
		ret = add_device(dev);
		if (ret < 0)
			return ret;
	}

	ret = open_cdev(dev);
	if (ret < 0)
		return ret;
	/* the driver may grant fewer queues than asked (one per CPU at most) */
	dev->nr_queues = dev->info.nr_hw_queues;
	dev->queues = calloc(dev->nr_queues, sizeof(*dev->queues));
	if (!dev->queues)
		return ubm_fail(ENOMEM, "out of memory");
	dev->tgt.queues = dev->queues;
	dev->tgt.max_io = dev->info.max_io_buf_bytes;
	dev->tgt.nr_queues = dev->nr_queues;
	for (i = 0; i < dev->nr_queues; i++) {
		struct ubm_queue *q = &dev->queues[i];
		void *m;

		q->dev = dev;
		q->tgt = &dev->tgt;
		q->q_id = i;
		q->depth = dev->info.queue_depth;
		q->path = dev->path;
		q->io_done = ubm_ublk_commit;
		q->bell_fd = -1;
		q->ios = calloc(q->depth, sizeof(*q->ios));
		if (!q->ios)
			return ubm_fail(ENOMEM, "out of memory");
		q->iods_len = (q->depth * sizeof(struct ublksrv_io_desc) + 4095) & ~4095ul;
		m = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE, dev->cdev_fd,
			 UBLKSRV_CMD_BUF_OFFSET + i * ubm_ublk_iods_stride());
		if (m == MAP_FAILED)
			return ubm_fail(errno, "mmap of queue %u descriptors failed: %s", i,
					strerror(errno));
		q->iods = m;
		/* per-ring backend state (NBD: a connection for each queue) */
		if (dev->tgt.source.ops->attach) {
			ret = dev->tgt.source.ops->attach(&dev->tgt.source, q, SLOT_SOURCE);
			if (ret < 0)
				return ret;
		}
	}
	return 0;
}

static void wake_and_join(struct ubm_dev *dev)
{
	unsigned i;

	if (!dev->nr_threads)
		return;
	for (i = 0; i < dev->nr_threads; i++) {
		if (dev->queues[i].init_err == 0)
			ubm_queue_ring_bell(&dev->queues[i], ACT_GIVE_UP | ACT_STOP);
	}
	for (i = 0; i < dev->nr_threads; i++)
		pthread_join(dev->queues[i].thread, NULL);
	dev->nr_threads = 0;
}

/*
 * The CPU a queue's thread stays on: the first of the CPUs the block layer
 * maps to the queue (GET_QUEUE_AFFINITY).  The driver completes a request
 * in the task that fetched it, and its submitters run on those CPUs: a
 * thread that stays put there avoids cross-CPU wake-ups and migrations
 * (kublk, the kernel's selftest server, does the same).  -1: no pinning.
 */
static int queue_cpu(struct ubm_dev *dev, unsigned q_id)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	if (ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_GET_QUEUE_AFFINITY, dev->info.dev_id, &set,
			 sizeof(set), q_id) < 0)
		return -1;
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (CPU_ISSET(cpu, &set))
			return cpu;
	}
	return -1;
}

UBM_EXPORT int ubm_dev_start(struct ubm_dev *dev)
{
	unsigned i;
	int ret = 0;

	if (dev->started)
		return 0;
	for (i = 0; i < dev->nr_queues; i++) {
		dev->queues[i].cpu = queue_cpu(dev, i);
		ret = -pthread_create(&dev->queues[i].thread, NULL, ubm_ublk_queue_thread,
				      &dev->queues[i]);
		if (ret < 0) {
			ubm_fail(ret, "cannot start queue thread: %s", strerror(-ret));
			break;
		}
		dev->nr_threads++;
	}
	for (i = 0; i < dev->nr_threads; i++)
		sem_wait(&dev->ready);
	for (i = 0; i < dev->nr_threads && ret == 0; i++) {
		if (dev->queues[i].init_err < 0)
			ret = dev->queues[i].init_err;
	}
	if (ret == 0 && dev->recovering) {
		/* the driver waits for every queue's FETCH_REQs, then reissues */
		ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_END_USER_RECOVERY, dev->info.dev_id, NULL,
				   0, (uint64_t)getpid());
		if (ret < 0)
			ubm_fail(ret, "END_USER_RECOVERY failed: %s", strerror(-ret));
		else
			dev->added = true;  /* ours now: deleted when we stop */
	} else if (ret == 0) {
		ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_START_DEV, dev->info.dev_id, NULL, 0,
				   (uint64_t)getpid());
		if (ret < 0)
			ubm_fail(ret, "START_DEV failed: %s", strerror(-ret));
	}
	if (ret < 0) {
		wake_and_join(dev);
		return ret;
	}
	dev->started = true;
	return 0;
}

UBM_EXPORT int ubm_dev_stop(struct ubm_dev *dev)
{
	int ret = 0;

	if (!dev->started || dev->stopped)
		return 0;
	/* requests waiting for a lost connection fail now: STOP_DEV waits for
	 * every request in flight */
	ubm_target_ring_bells(&dev->tgt, ACT_GIVE_UP);
	/* STOP_DEV removes the disk once in-flight requests are done (the
	 * queue threads keep serving them meanwhile) and aborts the fetches */
	ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_STOP_DEV, dev->info.dev_id, NULL, 0, 0);
	if (ret < 0)
		ubm_fail(ret, "STOP_DEV failed: %s", strerror(-ret));
	/* no request can arrive any more; leftover fetches die with the rings */
	wake_and_join(dev);
	dev->stopped = true;
	return ret;
}

UBM_EXPORT void ubm_dev_destroy(struct ubm_dev *dev)
{
	unsigned i;
	int ret;

	if (!dev)
		return;
	if (dev->started)
		ubm_dev_stop(dev);
	wake_and_join(dev);
	if (dev->tgt.router)
		ubm_mig_finish(&dev->tgt);  /* nothing is in flight: a cancel */
	/* (before the queues go: a backend may hold per-queue state) */
	ubm_target_fini(&dev->tgt);
	for (i = 0; dev->queues && i < dev->nr_queues; i++) {
		struct ubm_queue *q = &dev->queues[i];

		ubm_queue_ring_exit(q);
		if (q->iods)
			munmap((void *)q->iods, q->iods_len);
		for (unsigned t = 0; q->ios && t < q->depth; t++)
			free(q->ios[t].buf);
		free(q->ios);
	}
	free(dev->queues);
	if (dev->cdev_fd >= 0)
		close(dev->cdev_fd);
	/* DEL_DEV waits for the char device to be released: close it first */
	if (dev->added) {
		ret = ubm_ctrl_cmd(&dev->ctrl, UBLK_U_CMD_DEL_DEV, dev->info.dev_id, NULL, 0, 0);
		if (ret < 0)
			fprintf(stderr, "ublkmig: DEL_DEV of device %u failed: %s\n", dev->info.dev_id,
				strerror(-ret));
	}
	ubm_ctrl_close(&dev->ctrl);
	sem_destroy(&dev->ready);
	free((char *)dev->cfg.source_path);
	free(dev);
}

UBM_EXPORT struct ubm_target *ubm_dev_target(struct ubm_dev *dev) { return &dev->tgt; }
UBM_EXPORT int ubm_dev_id(const struct ubm_dev *dev) { return (int)dev->info.dev_id; }
UBM_EXPORT uint64_t ubm_dev_size(const struct ubm_dev *dev) { return dev->tgt.source.size; }
UBM_EXPORT int ubm_dev_path(const struct ubm_dev *dev) { return dev->path; }
UBM_EXPORT uint64_t ubm_dev_flags(const struct ubm_dev *dev) { return dev->info.flags; }
UBM_EXPORT uint32_t ubm_dev_nr_queues(const struct ubm_dev *dev) { return dev->nr_queues; }
UBM_EXPORT void ubm_dev_config(const struct ubm_dev *dev, struct ubm_config *out)
{
	*out = dev->cfg;
	out->nr_queues = dev->nr_queues;
	out->data_path = (uint32_t)dev->path;
	out->dev_id = (int32_t)dev->info.dev_id;
	out->max_io_bytes = dev->info.max_io_buf_bytes;
}

UBM_EXPORT void ubm_dev_stats(const struct ubm_dev *dev, struct ubm_stats *out)
{
	unsigned i;

	memset(out, 0, sizeof(*out));
	for (i = 0; i < dev->nr_queues; i++)
		ubm_stats_add(out, &dev->queues[i].stats);
	ubm_target_stats(&dev->tgt, out);
}
