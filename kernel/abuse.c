// SPDX-License-Identifier: GPL-2.0
/*
 * abuse: A Block device in User SpacE.
 *
 * Every request to /dev/abuseN is put on a per-disk queue.  Worker
 * processes open the control device /dev/abuse, ATTACH to a disk, and
 * move requests with two ioctls: GET hands out a batch (copying write
 * payloads into the caller's buffer), PUT completes a batch (copying
 * read data back).  There is no session: a request held by a file that
 * is closed, or unanswered past its timeout, goes back to the queue
 * with a new generation, so a late answer from its old holder is
 * refused and every request is completed exactly once.
 *
 * Descends from the 2009 aBUSE patch; the batching follows ublk.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/highmem.h>
#include <linux/hrtimer.h>
#include <linux/idr.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/pid.h>
#include <linux/poll.h>
#include <linux/sched/clock.h>
#include <linux/sched/signal.h>
#include <linux/sched/stat.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>

#include "abuse.h"

/* The block layer needs a timer; with timeout 0 it only rearms. */
#define ABUSE_IDLE_TIMER	(30 * HZ)
#define ABUSE_MAX_TIMEOUT_MS	(24U * 3600 * 1000)
#define ABUSE_MAX_RETRIES	1000
/* PUT reads replies, and GET takes requests, in chunks this big. */
#define ABUSE_PUT_CHUNK		16
#define ABUSE_GET_CHUNK		16
#define ABUSE_ONE		1024	/* 1.0 in abuse_worker.cycle_blocks */
#define ABUSE_WQ_LEAD		WQ_FLAG_CUSTOM	/* the lead's entry in get_wait */

/*
 * Dispatch tuning (see "Dispatch" below); 0 turns each one off.  Read
 * once per decision, so a change applies at once.
 */
static unsigned int wake_max_us = 10000;
module_param(wake_max_us, uint, 0644);
MODULE_PARM_DESC(wake_max_us,
		 "Longest a queued request waits for a busy worker before an idle one is woken (us; 0: wake at once)");
/*
 * 10 ms, not the 2 ms it was: each lazy wake-up, and each run of the
 * wake timer, cost a 2-CPU machine more than the second worker gained
 * (2 workers at 0.75-0.89x of one with 2 ms, 0.93-1.01x with 10 ms, in
 * one boot on 6.1; a shorter probe on 6.12 could not tell: SCALING.md).
 * So by default the bound is 10 ms, and three cycles count only with
 * wake_max_us raised past it.
 */
static unsigned int wake_min_us = 10000;
module_param(wake_min_us, uint, 0644);
MODULE_PARM_DESC(wake_min_us,
		 "Shortest a queued request waits for a busy worker before an idle one is woken (us)");
/*
 * How much data a GET takes while another worker sleeps (abuse_share),
 * e.g. 1024: above what a batch of small requests holds (64 of 4 KiB),
 * so that those stay with one worker.  Off by default: on 2 CPUs the
 * extra copier only took CPU time from the submitters (docs/SCALING.md).
 */
static unsigned int share_kib;
module_param(share_kib, uint, 0644);
MODULE_PARM_DESC(share_kib,
		 "Data a GET takes while another worker sleeps; the rest is that one's, woken at once (KiB; 0, the default: no limit)");
static unsigned int spin_max_us = 200;
module_param(spin_max_us, uint, 0644);
MODULE_PARM_DESC(spin_max_us,
		 "Longest a GET polls for the next request before it sleeps (us; 0: never poll)");

/*
 * Where a request is.  Only the holder of dev->lock moves a request
 * between states, and only the path that moves it to IDLE ends it.
 * queue_rq hands a request over without the lock (dev->submitted): it
 * stays IDLE there until a holder of the lock moves it to QUEUED
 * (abuse_take_submitted).
 */
enum abuse_cmd_state {
	ABUSE_CMD_IDLE,		/* not ours: never queued, or being ended */
	ABUSE_CMD_QUEUED,	/* on dev->queue, waiting for a GET */
	ABUSE_CMD_IN_FLIGHT,	/* handed to a worker, waiting for its PUT */
	ABUSE_CMD_BUSY,		/* a GET or PUT copies its data, lock dropped */
};

struct abuse_worker;

/* Per-request driver data (blk-mq pdu).  Under dev->lock. */
struct abuse_cmd {
	struct list_head node;	/* on dev->queue while QUEUED */
	struct llist_node submitted; /* on dev->submitted, lock-free */
	struct abuse_worker *holder; /* IN_FLIGHT/BUSY: who has it */
	u64 queued_ns;		/* QUEUED: when it (re)entered the queue */
	unsigned long handed_out; /* IN_FLIGHT/BUSY: jiffies of the GET */
	u32 timeouts;		/* timer expiries in this request's life */
	u8 state;		/* enum abuse_cmd_state */
	bool fail_pending;	/* BUSY: end with -EIO once the copy is done */
};

/* abuse_worker.flags */
enum {
	ABUSE_W_SERVING,	/* holds a batch, out of the driver */
};

/*
 * What dispatch did, for /sys/block/abuseN/abuse/dispatch: counted where
 * a worker is woken or sleeps, never per request.
 */
enum abuse_dispatch_stat {
	ABUSE_DS_WAKE_NOW,	/* queue_rq woke a sleeper at once */
	ABUSE_DS_WAKE_LAZY,	/* the wake timer woke one for a late request */
	ABUSE_DS_WAKE_PASSED,	/* a GET or requeue passed a wake-up on */
	ABUSE_DS_SLEEPS,	/* GETs that slept for work */
	ABUSE_DS_POLLS,		/* GETs that polled for work */
	ABUSE_DS_POLL_HITS,	/* of those, work came while polling */
	ABUSE_DS_BATCHES,	/* GETs that handed out requests */
	ABUSE_DS_DEFERRED,	/* GETs that left the queue to the lead */
	ABUSE_DS_TIMER_RUNS,	/* wake timer expiries */
	ABUSE_DS_COUNT
};

static const char *const abuse_dispatch_names[ABUSE_DS_COUNT] = {
	[ABUSE_DS_WAKE_NOW] = "wake_now",
	[ABUSE_DS_WAKE_LAZY] = "wake_lazy",
	[ABUSE_DS_WAKE_PASSED] = "wake_passed",
	[ABUSE_DS_SLEEPS] = "sleeps",
	[ABUSE_DS_POLLS] = "polls",
	[ABUSE_DS_POLL_HITS] = "poll_hits",
	[ABUSE_DS_BATCHES] = "batches",
	[ABUSE_DS_DEFERRED] = "deferred",
	[ABUSE_DS_TIMER_RUNS] = "timer_runs",
};

/* abuse_device.flags */
enum {
	ABUSE_DEV_TIMER_ARMED,	/* wake_timer queued or running */
	ABUSE_DEV_WAKING,	/* a sleeper was woken, has not looked yet */
};

/*
 * struct abuse_worker - one attached file, as the driver sees a worker.
 * Freed at the file's release, after its requests went back.
 */
struct abuse_worker {
	struct abuse_device *dev;
	struct list_head node;		/* on dev->workers; dev->lock */
	u64 id;				/* for fdinfo and debugfs; set at ATTACH */
	/* tgid of the last GET, else of ATTACH; dev->lock (read unlocked
	 * only to compare with the caller's)
	 */
	struct pid *owner;
	struct pid *kill;		/* fenced, SIGKILL not yet sent; dev->lock */
	bool fenced;			/* killed by the fence: no more GETs */
	unsigned long flags;		/* ABUSE_W_*, atomic bitops */
	u64 serving_since;		/* ns: the GET that gave it its batch */
	/* its last GET handed it requests, when its thread had made
	 * @nvcsw_out voluntary switches; a hint (threads may share a file)
	 */
	bool handed_out;
	unsigned long nvcsw_out;
	/* EWMA of the batches it blocked in (from the GET that handed it
	 * one to its next GET), in 1/ABUSE_ONE; a hint
	 */
	u64 cycle_blocks;
	u32 batch_max;			/* its last GET's max_requests; a hint */
	/* EWMA of its waits for work, each until the next request came,
	 * not until we woke to take it (the polling budget); racy between
	 * threads sharing the file: a hint
	 */
	u64 gap_ns;
};

/*
 * struct abuse_device - one /dev/abuseN.
 *
 * Lock order: abuse_ctl_mutex, then disk->open_mutex, then @lock, then
 * the wait queues' own locks.  @lock is taken from the wake timer's
 * hard interrupt, so always with interrupts off.
 * Lifetime: @kref has one reference for the gendisk (dropped by
 * ->free_disk) and one per attached file.  The tag set and @rqs live
 * until the last reference goes.
 */
struct abuse_device {
	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	struct kref kref;
	wait_queue_head_t get_wait;	/* GET sleepers: lead first, then LIFO */
	wait_queue_head_t poll_wait;	/* pollers */
	struct hrtimer wake_timer;	/* the lazy wake-up, see abuse_enqueued */
	atomic_t nr_serving;		/* workers with ABUSE_W_SERVING */
	/* EWMA of a batch's time out of the driver; racy, a hint */
	u64 cycle_ns;
	unsigned long flags;		/* ABUSE_DEV_*, atomic bitops */
	/*
	 * queue_rq's requests, newest first, taken onto @queue by the next
	 * holder of @lock: submitting takes no lock (see "Dispatch").
	 */
	struct llist_head submitted;

	spinlock_t lock;		/* protects all below and each abuse_cmd */
	struct abuse_config config;	/* size and read-only change online */
	struct abuse_counters stats;	/* queued/in_flight/attached: current */
	struct list_head queue;		/* QUEUED requests, oldest first */
	u64 queued_bytes;		/* data of the QUEUED reads and writes */
	struct list_head workers;	/* attached files' abuse_worker */
	struct request **rqs;		/* by tag: every request not IDLE */
	/*
	 * By tag: the handle generation, bumped at hand-out, requeue and
	 * end.  Per tag, not per request: one tag carries several requests
	 * in turn, each with its own pdu (an I/O scheduler's, or blk-mq's
	 * flush request, which borrows the tag of the write it flushes
	 * for), and a count per pdu would hand out a handle that a stale
	 * PUT still names.
	 */
	u32 *gens;
	u64 last_token;			/* fencing token of the last hand-out */
	struct abuse_worker *spinner;	/* the one GET polling for work */
	struct abuse_worker *lead;	/* the last one to take a batch */
	/* the lead blocks in its backend (abuse_worker_computes): read
	 * without the lock by queue_rq, a hint
	 */
	bool lead_blocks;
	u64 lock_since, lock_ns, lock_taken;	/* lock_stats */
	bool dead;			/* destroyed: fail everything */
	/* lock-free: abuse_dispatch_stat */
	atomic_long_t dispatch[ABUSE_DS_COUNT];
};

static void abuse_count(struct abuse_device *dev, enum abuse_dispatch_stat s,
			long nr)
{
	atomic_long_add(nr, &dev->dispatch[s]);
}

/*
 * Lock statistics for the scaling model (docs/SCALING.md): with the
 * module parameter lock_stats on, the request path's critical sections
 * on dev->lock are timed, and /sys/block/abuseN/abuse/lock_stats shows
 * "<sections> <ns held>".  Off, it costs one read per section.
 */
static bool lock_stats;
module_param(lock_stats, bool, 0644);
MODULE_PARM_DESC(lock_stats, "Time the request path's hold of the disk lock (for docs/SCALING.md)");

static void abuse_held_from(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	dev->lock_since = READ_ONCE(lock_stats) ? local_clock() : 0;
}

static void abuse_held_until(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	if (dev->lock_since) {
		dev->lock_ns += local_clock() - dev->lock_since;
		dev->lock_taken++;
		dev->lock_since = 0;
	}
}

/* dev->lock on the request path: GET and PUT. */
static void abuse_lock(struct abuse_device *dev)
	__acquires(&dev->lock)
{
	spin_lock_irq(&dev->lock);
	abuse_held_from(dev);
}

static void abuse_unlock(struct abuse_device *dev)
	__releases(&dev->lock)
{
	abuse_held_until(dev);
	spin_unlock_irq(&dev->lock);
}

static DEFINE_MUTEX(abuse_ctl_mutex);	/* protects abuse_index_idr */
static DEFINE_IDR(abuse_index_idr);
static u64 abuse_last_worker_id;	/* abuse_ctl_mutex */

#ifdef ABUSE_SELFTEST_BUGS
/*
 * Deliberate bugs, built only by scripts/debug-tier --detectors (never
 * in the normal module), to prove that the debug kernel's detectors see
 * this driver: tests/kernel/detectors sets selftest_bug and expects
 * KASAN's or lockdep's report in the kernel log.
 */
#define ABUSE_BUG_USE_AFTER_END	1	/* KASAN: read a request's record after its end */
#define ABUSE_BUG_LOCK_ORDER	2	/* lockdep: open_mutex, then ctl */

static int selftest_bug;
module_param(selftest_bug, int, 0644);
MODULE_PARM_DESC(selftest_bug,
		 "Test builds only: 1 = use a request's record after ending it, 2 = take abuse_ctl_mutex under open_mutex (default 0: none)");

/*
 * The bug keeps a record of the request in memory freed with it, then
 * reads the record.  It cannot read the bio itself: the block layer may
 * still hold a completed bio (a chained split's parent, a bio cache), so
 * KASAN would not always see that read (the first detector run did not).
 */
static void abuse_end_request(struct request *rq, blk_status_t sts)
{
	sector_t *record = NULL;

	if (READ_ONCE(selftest_bug) == ABUSE_BUG_USE_AFTER_END)
		record = kmalloc(sizeof(*record), GFP_ATOMIC);
	if (record)
		*record = blk_rq_pos(rq);
	blk_mq_end_request(rq, sts);
	if (!record)
		return;
	kfree(record);
	pr_info("selftest: ended request was at sector %llu\n",
		(unsigned long long)*record);
}

/* Under disk->open_mutex, which abuse_ctl_destroy() takes under ctl. */
static void abuse_selftest_open(void)
{
	if (READ_ONCE(selftest_bug) != ABUSE_BUG_LOCK_ORDER)
		return;
	mutex_lock(&abuse_ctl_mutex);
	mutex_unlock(&abuse_ctl_mutex);
}
#else
static inline void abuse_end_request(struct request *rq, blk_status_t sts)
{
	blk_mq_end_request(rq, sts);
}

static inline void abuse_selftest_open(void)
{
}
#endif

/* ---------------------------------------------------------------------
 * Kernel compat: the only code that differs between 6.1 and 6.12.
 * 6.5 passes ->open the gendisk and a blk_mode_t; 6.11 takes the queue
 * limits, cache and rotational flags included, when the disk is
 * allocated instead of setting them on the queue afterwards.  Tested
 * on 6.1 and 6.12; keyed on macros that came with each change.
 */
static int abuse_disk_open(struct gendisk *disk);

#ifdef BLK_OPEN_READ		/* 6.5 */
static int abuse_bdev_open(struct gendisk *disk, blk_mode_t mode)
{
	return abuse_disk_open(disk);
}
#else
static int abuse_bdev_open(struct block_device *bdev, fmode_t mode)
{
	return abuse_disk_open(bdev->bd_disk);
}
#endif

#ifdef BLK_FEAT_WRITE_CACHE	/* 6.11 */
static struct gendisk *abuse_alloc_disk(struct abuse_device *dev)
{
	const struct abuse_config *cfg = &dev->config;
	struct queue_limits lim = {
		.logical_block_size	= cfg->block_size,
		.physical_block_size	= cfg->block_size,
		.io_min			= cfg->block_size,
		.max_hw_sectors		= cfg->max_request_bytes >> SECTOR_SHIFT,
	};

	if (cfg->flags & ABUSE_F_DISCARD) {
		lim.discard_granularity = cfg->block_size;
		lim.max_hw_discard_sectors = UINT_MAX >> SECTOR_SHIFT;
	}
	if (cfg->flags & ABUSE_F_WRITE_ZEROES)
		lim.max_write_zeroes_sectors = UINT_MAX >> SECTOR_SHIFT;
	if (cfg->flags & ABUSE_F_FLUSH)
		lim.features |= BLK_FEAT_WRITE_CACHE | BLK_FEAT_FUA;
	if (cfg->flags & ABUSE_F_ROTATIONAL)
		lim.features |= BLK_FEAT_ROTATIONAL;
	return blk_mq_alloc_disk(&dev->tag_set, &lim, dev);
}
#else
static struct gendisk *abuse_alloc_disk(struct abuse_device *dev)
{
	const struct abuse_config *cfg = &dev->config;
	bool cache = cfg->flags & ABUSE_F_FLUSH;
	struct request_queue *q;
	struct gendisk *disk;

	disk = blk_mq_alloc_disk(&dev->tag_set, dev);
	if (IS_ERR(disk))
		return disk;
	q = disk->queue;
	blk_queue_logical_block_size(q, cfg->block_size);
	blk_queue_physical_block_size(q, cfg->block_size);
	blk_queue_io_min(q, cfg->block_size);
	blk_queue_max_hw_sectors(q, cfg->max_request_bytes >> SECTOR_SHIFT);
	if (cfg->flags & ABUSE_F_DISCARD) {
		q->limits.discard_granularity = cfg->block_size;
		blk_queue_max_discard_sectors(q, UINT_MAX >> SECTOR_SHIFT);
	}
	if (cfg->flags & ABUSE_F_WRITE_ZEROES)
		blk_queue_max_write_zeroes_sectors(q,
						   UINT_MAX >> SECTOR_SHIFT);
	blk_queue_write_cache(q, cache, cache);
	if (cfg->flags & ABUSE_F_ROTATIONAL)
		blk_queue_flag_clear(QUEUE_FLAG_NONROT, q);
	else
		blk_queue_flag_set(QUEUE_FLAG_NONROT, q);
	return disk;
}
#endif

static inline struct abuse_cmd *abuse_cmd(struct request *rq)
{
	return blk_mq_rq_to_pdu(rq);
}

static inline u64 abuse_handle(struct abuse_device *dev, struct request *rq)
{
	return (u64)dev->gens[rq->tag] << 32 | rq->tag;
}

/*
 * A GET stops taking requests once it holds this much data while another
 * worker sleeps, and wakes that one for the rest (share_kib; U64_MAX
 * when 0): big requests are copied by several workers at once.
 */
static u64 abuse_share_bytes(void)
{
	u64 kib = READ_ONCE(share_kib);

	return kib ? kib * SZ_1K : U64_MAX;
}

/* Bytes of data a read or write carries; 0 for the other requests. */
static u32 abuse_payload(struct request *rq)
{
	if (req_op(rq) != REQ_OP_READ && req_op(rq) != REQ_OP_WRITE)
		return 0;
	return blk_rq_bytes(rq);
}

/* Move @rq to @state and keep the counters true.  Must hold dev->lock. */
static void abuse_set_state(struct abuse_device *dev, struct request *rq,
			    enum abuse_cmd_state state)
	__must_hold(&dev->lock)
{
	struct abuse_cmd *cmd = abuse_cmd(rq);

	lockdep_assert_held(&dev->lock);
	if (cmd->state == ABUSE_CMD_QUEUED) {
		list_del_init(&cmd->node);
		dev->stats.queued--;
		dev->queued_bytes -= abuse_payload(rq);
	} else if (cmd->state != ABUSE_CMD_IDLE) {
		dev->stats.in_flight--;
	}

	cmd->state = state;
	if (state == ABUSE_CMD_QUEUED) {
		dev->stats.queued++;
		dev->queued_bytes += abuse_payload(rq);
	} else if (state != ABUSE_CMD_IDLE) {
		dev->stats.in_flight++;
	}
}

/*
 * Move the requests queue_rq handed over lock-free onto dev->queue,
 * oldest first, so that every holder of dev->lock sees one queue (and
 * true counters).  Must hold dev->lock.
 */
static void abuse_take_submitted(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	struct abuse_cmd *cmd, *next;
	struct llist_node *first;

	lockdep_assert_held(&dev->lock);
	if (llist_empty(&dev->submitted))
		return;
	first = llist_reverse_order(llist_del_all(&dev->submitted));
	llist_for_each_entry_safe(cmd, next, first, submitted) {
		struct request *rq = blk_mq_rq_from_pdu(cmd);

		dev->rqs[rq->tag] = rq;
		abuse_set_state(dev, rq, ABUSE_CMD_QUEUED);
		list_add_tail(&cmd->node, &dev->queue);
	}
}

/*
 * Put @rq back on the queue with a new generation, so that a PUT from
 * its old holder is refused.  Must hold dev->lock; the caller wakes a
 * worker (abuse_wake) after unlocking.
 */
static void abuse_requeue(struct abuse_device *dev, struct request *rq)
	__must_hold(&dev->lock)
{
	struct abuse_cmd *cmd = abuse_cmd(rq);

	abuse_set_state(dev, rq, ABUSE_CMD_QUEUED);
	dev->gens[rq->tag]++;
	cmd->holder = NULL;
	/* It was handed out before anything now queued: serve it first. */
	cmd->queued_ns = local_clock();
	list_add(&cmd->node, &dev->queue);
	dev->stats.requeued++;
}

/*
 * Take @rq from the driver's hands with @status; the caller ends it
 * after dropping the lock.  Must hold dev->lock.
 */
static void abuse_retire(struct abuse_device *dev, struct request *rq,
			 blk_status_t status)
	__must_hold(&dev->lock)
{
	struct abuse_cmd *cmd = abuse_cmd(rq);

	abuse_set_state(dev, rq, ABUSE_CMD_IDLE);
	dev->gens[rq->tag]++;
	cmd->holder = NULL;
	dev->rqs[rq->tag] = NULL;
	dev->stats.completed++;
	if (status != BLK_STS_OK)
		dev->stats.errors++;
	else if (req_op(rq) == REQ_OP_READ)
		dev->stats.bytes_read += blk_rq_bytes(rq);
	else if (req_op(rq) == REQ_OP_WRITE)
		dev->stats.bytes_written += blk_rq_bytes(rq);
}

/* End every request on @done with -EIO.  Called without dev->lock. */
static void abuse_end_list(struct list_head *done)
{
	struct abuse_cmd *cmd, *next;

	list_for_each_entry_safe(cmd, next, done, node) {
		list_del_init(&cmd->node);
		blk_mq_end_request(blk_mq_rq_from_pdu(cmd), BLK_STS_IOERR);
	}
}

/*
 * Fence @w: mark it so that it gets no more requests, and leave it a
 * SIGKILL for abuse_kill_fenced() to send once dev->lock is dropped.
 * What it holds stays its own until its file is released: only then can
 * nothing it was given be stored any more.  Must hold dev->lock.
 */
static void abuse_fence(struct abuse_device *dev, struct abuse_worker *w)
	__must_hold(&dev->lock)
{
	if (w->fenced)
		return;
	w->fenced = true;
	w->kill = get_pid(w->owner);
	dev->stats.fenced++;
}

/* Send the SIGKILLs that abuse_fence() left.  Called without dev->lock. */
static void abuse_kill_fenced(struct abuse_device *dev)
{
	for (;;) {
		struct abuse_worker *w;
		struct pid *pid = NULL;

		spin_lock_irq(&dev->lock);
		list_for_each_entry(w, &dev->workers, node) {
			if (w->kill) {
				pid = w->kill;
				w->kill = NULL;
				break;
			}
		}
		spin_unlock_irq(&dev->lock);
		if (!pid)
			return;
		dev_warn_ratelimited(disk_to_dev(dev->disk),
				     "fencing worker pid %d: it held a request past the timeout or a reset; killed, its requests wait for its exit\n",
				     pid_vnr(pid));
		kill_pid(pid, SIGKILL, 1);
		put_pid(pid);
	}
}

/*
 * Fail every request of @dev, queued or in flight, onto @done.  Those
 * being copied (BUSY) are failed by their copier when it relocks.  If
 * @fence (RESET with ABUSE_F_FENCE; not DESTROY, whose workers end on
 * their own) their holders are fenced too: a write that ended with -EIO
 * must not land later over a newer one.  Must hold dev->lock; the
 * caller ends @done and calls abuse_kill_fenced() after unlocking.
 */
static void abuse_fail_requests(struct abuse_device *dev,
				struct list_head *done, bool fence)
	__must_hold(&dev->lock)
{
	unsigned int tag;

	abuse_take_submitted(dev);
	for (tag = 0; tag < dev->config.queue_depth; tag++) {
		struct request *rq = dev->rqs[tag];
		struct abuse_cmd *cmd;

		if (!rq)
			continue;
		cmd = abuse_cmd(rq);
		if (fence && cmd->holder)
			abuse_fence(dev, cmd->holder);
		if (cmd->state == ABUSE_CMD_BUSY) {
			cmd->fail_pending = true;
			continue;
		}
		abuse_retire(dev, rq, BLK_STS_IOERR);
		list_add_tail(&cmd->node, done);
	}
}

/*
 * Requeue the in-flight requests of @holder, or all of them if NULL.
 * Must hold dev->lock.  Returns how many went back.
 */
static unsigned int abuse_requeue_in_flight(struct abuse_device *dev,
					    struct abuse_worker *holder)
	__must_hold(&dev->lock)
{
	unsigned int tag, count = 0;

	for (tag = 0; tag < dev->config.queue_depth; tag++) {
		struct request *rq = dev->rqs[tag];

		if (!rq || abuse_cmd(rq)->state != ABUSE_CMD_IN_FLIGHT)
			continue;
		if (holder && abuse_cmd(rq)->holder != holder)
			continue;
		abuse_requeue(dev, rq);
		count++;
	}
	return count;
}

/*
 * RESET without ABUSE_RESET_FAIL: take every in-flight request from its
 * holder.  Without ABUSE_F_FENCE they are requeued now; with it their
 * holders are fenced, and each goes back when its holder's file is
 * released.  Must hold dev->lock.  Returns how many were requeued.
 */
static unsigned int abuse_reclaim_in_flight(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	unsigned int tag;

	if (!(dev->config.flags & ABUSE_F_FENCE))
		return abuse_requeue_in_flight(dev, NULL);
	for (tag = 0; tag < dev->config.queue_depth; tag++) {
		struct request *rq = dev->rqs[tag];

		if (rq && abuse_cmd(rq)->holder)
			abuse_fence(dev, abuse_cmd(rq)->holder);
	}
	return 0;
}

/* ---------------------------------------------------------------------
 * Dispatch: who is woken for a queued request, and when.
 *
 * GET sleepers wait exclusively, the lead (the last worker to take a
 * batch) at the head and the others behind it, the last to sleep first
 * (abuse_wait_work), so one warm worker takes the requests while the
 * others sleep on.  Waking a second worker for every request while the
 * first is busy with a batch split the batches and made two workers
 * slower than one, so:
 *
 *  - while a worker is polling in GET (abuse_spin_for_work), nobody is
 *    woken: it takes the request at once;
 *  - while some worker holds a batch (ABUSE_W_SERVING, from its GET's
 *    first take: it will come back with PUT+GET) and the lead computes,
 *    the wake-up is lazy.
 *    Once the oldest request has waited for the bound, three times the
 *    usual time from one batch's GET to the next (cycle_ns: how long a
 *    request queued behind a busy worker waits for it) within
 *    [wake_min_us, wake_max_us], the wake timer wakes as many sleepers
 *    as the queue needs (abuse_workers_short): one when the lead did
 *    not come back in time (it is stopped, or its backend is slow);
 *    while the lead waits in its backend (it blocks:
 *    abuse_worker_computes), one per queued request; while it
 *    computes, none until the queue outgrew what the serving workers
 *    take in three rounds.  A busy worker counts as such until one of its GETs
 *    finds the queue empty, polling included, and it is on the wait
 *    queue (abuse_set_serving, abuse_wait_work);
 *  - with no sleeper there is nothing to do: a worker about to sleep
 *    looks at the queue first;
 *  - a worker back for more while the lead serves, computes, runs on a
 *    CPU and keeps up leaves the queue to it (abuse_defer): it sleeps, and the
 *    wake timer wakes it if the lead stops keeping up; if its GET's wait
 *    runs out first, the GET returns empty.  Else every
 *    worker woken once stayed busy, taking a share of each burst: on a
 *    machine whose CPUs the lead and the submitters already use, the
 *    extra worker only took CPU time from them (two workers ran at
 *    0.6x of one).  A lead that sleeps (a backend that waits) or is
 *    stopped is not waited for;
 *  - with share_kib set, big requests are shared: a GET that holds
 *    that much data while another worker sleeps leaves the rest, and
 *    wakes that one at once (abuse_share); no worker defers to the lead
 *    while that much is queued.  Most of a big request's time is its
 *    copy, which a second worker can do on a CPU nobody else uses (on
 *    2 CPUs there was none: off by default);
 *  - otherwise (nobody serves, or the lead blocks in its backend: an
 *    idle worker can start the request now, the serving ones only after
 *    their waits) one sleeper is woken at once, and the requests that
 *    follow it before it looks at the queue (ABUSE_DEV_WAKING) wait for
 *    it as for a busy worker; it passes the wake-up on for what it
 *    leaves.  Without that, each request of a burst woke one more
 *    sleeper: the woken worker leaves the wait queue at once but takes
 *    the requests only once it runs, so two workers both woke for every
 *    burst and each took half of it.
 *
 * Submitting takes no lock: queue_rq pushes the request on
 * dev->submitted (an llist) and decides the wake-up from atomics, and
 * whoever takes dev->lock next (a GET, the wake timer, a timeout, RESET,
 * DESTROY) moves what was submitted onto dev->queue.  So the disk's
 * lock is taken per chunk of requests, by the workers, and never once
 * per request by every submitting CPU (docs/SCALING.md).  Each check
 * that queue_rq could race with pairs a full barrier on its side (the
 * llist_add's cmpxchg, wq_has_sleeper's smp_mb) with one on the other.
 */

/*
 * Request-path times come from local_clock(), not the clocksource: it
 * reads the TSC even where the clocksource is slow to read (the HPET of
 * an emulated guest, where a read per request cost more than the
 * request).  Two CPUs' readings may disagree, by up to a tick where the
 * TSCs are not synchronised (the emulated guest marks its TSC unstable
 * for that), and a stamp another CPU wrote may be newer than our own
 * reading: so a time between two readings is never negative
 * (abuse_ns_since), which as a u64 would look like ages.
 */
static u64 abuse_ns_since(u64 then, u64 now)
{
	return now > then ? now - then : 0;
}

static u64 abuse_ns_until(u64 when)
{
	return abuse_ns_since(local_clock(), when);
}

/* Fold @sample into the moving average at @avg, with weight 1/@weight. */
static void abuse_fold(u64 *avg, u64 sample, unsigned int weight)
{
	u64 old = READ_ONCE(*avg);

	WRITE_ONCE(*avg, old - old / weight + sample / weight);
}

/*
 * Arm the wake timer for @when unless it is armed: an armed timer looks
 * at the queue when it fires, and again while requests are queued.
 */
static void abuse_arm_wake_timer(struct abuse_device *dev, u64 when)
{
	if (!test_and_set_bit(ABUSE_DEV_TIMER_ARMED, &dev->flags))
		hrtimer_start(&dev->wake_timer,
			      ns_to_ktime(abuse_ns_until(when)),
			      HRTIMER_MODE_REL);
}

/* The lazy wake-up's bound, in ns; 0 when the module parameter is 0. */
static u64 abuse_wake_bound(struct abuse_device *dev)
{
	u64 max = (u64)READ_ONCE(wake_max_us) * NSEC_PER_USEC;
	u64 min = (u64)READ_ONCE(wake_min_us) * NSEC_PER_USEC;

	return clamp_t(u64, 3 * READ_ONCE(dev->cycle_ns), min,
		       max_t(u64, max, min)) * !!max;
}

/*
 * @nr requests (re)entered the queue, or are late: wake as many GET
 * sleepers, and pollers; count them as @why.
 */
static void abuse_wake(struct abuse_device *dev, unsigned int nr,
		       enum abuse_dispatch_stat why)
{
	abuse_count(dev, why, nr);
	wake_up_nr(&dev->get_wait, nr);
	if (wq_has_sleeper(&dev->poll_wait))
		wake_up(&dev->poll_wait);
}

/*
 * A request was queued at @since, the oldest one waiting: decide how
 * its worker is found (see above).  Needs no lock.  Returns true if the
 * caller must wake a sleeper at once.
 */
static bool abuse_enqueued(struct abuse_device *dev, u64 since)
{
	u64 bound;

	/* The poller looks at the queue once more as it stops. */
	if (READ_ONCE(dev->spinner))
		return false;
	/*
	 * No sleeper, nothing to wake, no timer to arm: a worker going to
	 * sleep looks at the queue once it is on the wait queue (the
	 * barrier in wq_has_sleeper() pairs with set_current_state()).
	 */
	if (!wq_has_sleeper(&dev->get_wait))
		return false;
	bound = abuse_wake_bound(dev);
	if (!bound)
		return true;
	/*
	 * Nobody serves, or the lead blocks in its backend (then so do the
	 * others, and an idle worker can start this request now): wake one
	 * sleeper, unless one was woken already and has not looked yet; it
	 * takes this request too, or passes the wake-up on, or the timer
	 * wakes another (a wake-up that found no sleeper left leaves the
	 * bit set until then).
	 */
	if ((!atomic_read(&dev->nr_serving) || READ_ONCE(dev->lead_blocks)) &&
	    !test_and_set_bit(ABUSE_DEV_WAKING, &dev->flags))
		return true;
	abuse_arm_wake_timer(dev, since + bound);
	return false;
}

/* Whether @w's task is on a CPU or waiting for one: a hint. */
static bool abuse_worker_running(struct abuse_worker *w)
	__must_hold(&w->dev->lock)
{
	struct task_struct *task;
	bool running;

	/* The leader of the last GET's process: a worker's one thread. */
	rcu_read_lock();
	task = pid_task(w->owner, PIDTYPE_TGID);
	running = task && task_is_running(task);
	rcu_read_unlock();
	return running;
}

/*
 * Whether @w computes (a backend that copies or calculates: more
 * workers would only share the CPUs) rather than waits (a network, a
 * slow disk: more workers would wait in parallel).  A worker that waits
 * blocks in its backend, a voluntary switch, while serving most of its
 * batches; one that computes is at most preempted (abuse_get measures
 * each batch).  (Its share of CPU time was a worse sign: with more busy
 * workers than CPUs, each one waits for a CPU as much as it runs, and
 * looked like one that waits.)
 */
static bool abuse_worker_computes(struct abuse_worker *w)
{
	return 2 * READ_ONCE(w->cycle_blocks) < ABUSE_ONE;
}

/*
 * How many more workers the queue needs, now that its oldest request
 * waited longer than the bound: one to replace a lead (the last worker
 * to take a batch) that did not come back within the bound (stopped, or
 * its backend is slow).  If the lead waits in its backend, one per
 * queued request: the serving workers wait too, and a request should
 * not wait while an idle worker could start it.  If it computes, as
 * many as the serving workers lack to take the queue in three rounds:
 * more workers would only share the busy CPUs, and a deep queue waits
 * some rounds by design.  Each serving worker is assumed to take what
 * the lead asked for (batch_max).
 */
static unsigned int abuse_workers_short(struct abuse_device *dev, u64 now,
					u64 bound)
	__must_hold(&dev->lock)
{
	struct abuse_worker *lead = dev->lead;
	u64 per_worker, need, serving;

	if (!lead || !test_bit(ABUSE_W_SERVING, &lead->flags) ||
	    abuse_ns_since(READ_ONCE(lead->serving_since), now) >= bound)
		return 1;
	if (!abuse_worker_computes(lead))
		return min_t(u64, dev->stats.queued, UINT_MAX);
	per_worker = 3ULL * max_t(u32, READ_ONCE(lead->batch_max), 1);
	need = div64_u64(dev->stats.queued + per_worker - 1, per_worker);
	/* Big requests: one worker per share of data (abuse_share). */
	need = max(need, div64_u64(dev->queued_bytes, abuse_share_bytes()));
	serving = atomic_read(&dev->nr_serving);
	return need > serving ? min_t(u64, need - serving, UINT_MAX) : 0;
}

/*
 * The lazy wake-up: once the oldest queued request has waited for the
 * bound, wake as many GET sleepers as the queue needs
 * (abuse_workers_short), and come back a bound later while requests
 * are queued, or when the oldest one reaches it.
 */
static enum hrtimer_restart abuse_wake_timer_fn(struct hrtimer *timer)
{
	struct abuse_device *dev = container_of(timer, struct abuse_device,
						wake_timer);
	enum hrtimer_restart ret = HRTIMER_NORESTART;
	u64 now = local_clock(), bound = abuse_wake_bound(dev);
	unsigned int late = 0;
	struct abuse_cmd *head;
	unsigned long flags;
	u64 next = 0;

	abuse_count(dev, ABUSE_DS_TIMER_RUNS, 1);
	spin_lock_irqsave(&dev->lock, flags);
	abuse_take_submitted(dev);
	head = list_first_entry_or_null(&dev->queue, struct abuse_cmd, node);
	if (head && abuse_ns_since(head->queued_ns, now) < bound) {
		next = head->queued_ns + bound;
	} else if (head) {
		late = abuse_workers_short(dev, now, bound);
		next = now + bound;	/* look again if they are still here */
	}
	if (!next || dev->dead) {
		/*
		 * Disarm, then look again: a request submitted meanwhile
		 * saw the timer armed and left itself to us.  Once the bit
		 * is clear, queue_rq may arm the timer itself: only the one
		 * that sets the bit again owns it.
		 */
		clear_bit(ABUSE_DEV_TIMER_ARMED, &dev->flags);
		/* Pairs with llist_add(), then test_and_set_bit(), in queue_rq. */
		smp_mb__after_atomic();
		next = 0;
		if (!dev->dead && !llist_empty(&dev->submitted) &&
		    !test_and_set_bit(ABUSE_DEV_TIMER_ARMED, &dev->flags))
			next = now + bound;
	}
	if (next) {
		hrtimer_forward_now(timer, ns_to_ktime(abuse_ns_until(next)));
		ret = HRTIMER_RESTART;
	}
	spin_unlock_irqrestore(&dev->lock, flags);

	if (late)
		abuse_wake(dev, late, ABUSE_DS_WAKE_LAZY);
	return ret;
}

/*
 * @w took a batch (true), or found nothing more to take (false): a
 * worker counts as busy from the moment a GET takes a batch (before its
 * copies) until a GET of its finds the queue empty, PUT+GET calls in
 * between included, since the GET half of those takes what queued
 * meanwhile.  Two batches in a row give a cycle: the time from one GET
 * to the next, copies, the worker's own time and its PUT included,
 * which is how long a request queued just after a GET waits for this
 * worker.  It is folded into
 * cycle_ns, the lazy wake-up's measure of "keeps up".  (The worker's
 * time alone was not enough: served in place, most of a batch's time
 * is the copies in the driver, and the bound fell below one cycle.)
 */
static void abuse_set_serving(struct abuse_device *dev,
			      struct abuse_worker *w, bool serving)
{
	u64 now;

	if (!serving) {
		if (test_and_clear_bit(ABUSE_W_SERVING, &w->flags))
			atomic_dec(&dev->nr_serving);
		return;
	}
	now = local_clock();
	if (test_and_set_bit(ABUSE_W_SERVING, &w->flags))
		abuse_fold(&dev->cycle_ns,
			   abuse_ns_since(w->serving_since, now), 8);
	else
		atomic_inc(&dev->nr_serving);
	WRITE_ONCE(w->serving_since, now);
}

/* ---------------------------------------------------------------------
 * blk-mq side
 */

static blk_status_t abuse_queue_rq(struct blk_mq_hw_ctx *hctx,
				   const struct blk_mq_queue_data *bd)
{
	struct abuse_device *dev = hctx->queue->queuedata;
	struct request *rq = bd->rq;
	struct abuse_cmd *cmd = abuse_cmd(rq);
	unsigned long flags;
	u64 queued_ns;
	bool wake;

	switch (req_op(rq)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
	case REQ_OP_FLUSH:
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		break;
	default:
		return BLK_STS_NOTSUPP;
	}

	blk_mq_start_request(rq);
	if (READ_ONCE(dev->dead))
		return BLK_STS_IOERR;

	cmd->holder = NULL;
	cmd->timeouts = 0;
	cmd->fail_pending = false;
	queued_ns = local_clock();
	cmd->queued_ns = queued_ns;
	/* From here a GET may take, serve and end @rq: do not touch it. */
	llist_add(&cmd->submitted, &dev->submitted);

	/*
	 * DESTROY marked the disk dead meanwhile: it may have failed every
	 * request before this one arrived, so fail what is left ourselves.
	 * Pairs with the smp_mb() in abuse_ctl_destroy(): either it takes
	 * @rq from dev->submitted, or we see dead.
	 */
	if (READ_ONCE(dev->dead)) {
		LIST_HEAD(done);

		spin_lock_irqsave(&dev->lock, flags);
		abuse_fail_requests(dev, &done, false);
		spin_unlock_irqrestore(&dev->lock, flags);
		abuse_end_list(&done);
		return BLK_STS_OK;
	}
	wake = abuse_enqueued(dev, queued_ns);

	/*
	 * Wakes one GET sleeper, and every poller.  Not the sync variant:
	 * it bets that the submitter sleeps next, but with a queue deep
	 * enough the submitter goes on submitting and the woken worker
	 * waits for its CPU (a backend that waits lost 2-5% to the hint, a
	 * fast one nothing: docs/SCALING.md, "The 5 ms backend's
	 * wake-ups").  wq_has_sleeper() pairs with the barrier in
	 * abuse_ctl_poll().
	 */
	if (wake) {
		abuse_count(dev, ABUSE_DS_WAKE_NOW, 1);
		wake_up_interruptible(&dev->get_wait);
	}
	if (wq_has_sleeper(&dev->poll_wait))
		wake_up_interruptible(&dev->poll_wait);
	return BLK_STS_OK;
}

/*
 * Timer expiry.  A request queued, or held since its GET, past the
 * timeout is requeued up to config.retries times, then failed, so a
 * disk with no worker still answers in bounded time.  With
 * ABUSE_F_FENCE a held one is not requeued: its holder is fenced, and
 * the request waits for the holder's file to be released.  With
 * timeout 0 the timer only rearms.
 */
static enum blk_eh_timer_return abuse_timeout(struct request *rq)
{
	struct abuse_device *dev = rq->q->queuedata;
	struct abuse_cmd *cmd = abuse_cmd(rq);
	enum blk_eh_timer_return ret = BLK_EH_RESET_TIMER;
	bool requeued = false, failed = false, fenced = false;
	unsigned long flags, held_for;
	u32 timeouts = 0;

	spin_lock_irqsave(&dev->lock, flags);
	abuse_take_submitted(dev);
	if (!dev->config.timeout_ms || dev->rqs[rq->tag] != rq ||
	    (cmd->state != ABUSE_CMD_QUEUED &&
	     cmd->state != ABUSE_CMD_IN_FLIGHT))
		goto out_unlock;

	/*
	 * The block layer's clock started at queue_rq; a worker gets the
	 * whole timeout from its GET (the timer rearms for another one).
	 */
	held_for = jiffies - cmd->handed_out;
	if (cmd->state == ABUSE_CMD_IN_FLIGHT &&
	    held_for < msecs_to_jiffies(dev->config.timeout_ms))
		goto out_unlock;

	dev->stats.timeouts++;
	timeouts = ++cmd->timeouts;
	if (cmd->state == ABUSE_CMD_IN_FLIGHT &&
	    dev->config.flags & ABUSE_F_FENCE) {
		/* Never failed while its holder lives: it might still store. */
		abuse_fence(dev, cmd->holder);
		fenced = true;
	} else if (timeouts > dev->config.retries) {
		abuse_retire(dev, rq, BLK_STS_IOERR);
		failed = true;
	} else if (cmd->state == ABUSE_CMD_IN_FLIGHT) {
		abuse_requeue(dev, rq);
		requeued = true;
	}
out_unlock:
	spin_unlock_irqrestore(&dev->lock, flags);

	if (failed) {
		dev_err_ratelimited(disk_to_dev(dev->disk),
				    "%s of %u bytes at %llu failed after %u timeouts: no worker answered\n",
				    blk_op_str(req_op(rq)), blk_rq_bytes(rq),
				    (u64)blk_rq_pos(rq) << SECTOR_SHIFT,
				    timeouts);
		blk_mq_end_request(rq, BLK_STS_IOERR);
		ret = BLK_EH_DONE;
	} else if (requeued) {
		abuse_wake(dev, 1, ABUSE_DS_WAKE_PASSED);
	} else if (fenced) {
		abuse_kill_fenced(dev);
	}
	return ret;
}

static int abuse_init_request(struct blk_mq_tag_set *set, struct request *rq,
			      unsigned int hctx_idx, unsigned int numa_node)
{
	struct abuse_cmd *cmd = abuse_cmd(rq);

	INIT_LIST_HEAD(&cmd->node);
	cmd->state = ABUSE_CMD_IDLE;
	return 0;
}

#ifdef CONFIG_BLK_DEBUG_FS
/*
 * blk-mq's debugfs lists every request it handed us
 * (/sys/kernel/debug/block/abuseN/hctx0/busy); this adds where each one is
 * here: its state, the handle a GET gave for it, and which attached file
 * (abuse_worker.id, as its fdinfo shows it) holds it and for how long.
 */
static void abuse_show_rq(struct seq_file *m, struct request *rq)
{
	static const char *const states[] = {
		[ABUSE_CMD_IDLE] = "idle",
		[ABUSE_CMD_QUEUED] = "queued",
		[ABUSE_CMD_IN_FLIGHT] = "held",
		[ABUSE_CMD_BUSY] = "busy",
	};
	struct abuse_device *dev = rq->q->queuedata;
	struct abuse_cmd *cmd = abuse_cmd(rq);
	unsigned long flags;

	/*
	 * Irqsave: blk-mq also shows requests from lists it walks under an
	 * irq-disabling lock (requeue_list, where flush requests pass).
	 * A holder stays attached while it holds: release requeues first.
	 */
	spin_lock_irqsave(&dev->lock, flags);
	seq_printf(m, ", .abuse_state=%s", states[cmd->state]);
	/* A tag's handle names the request the driver has on that tag. */
	if (cmd->state != ABUSE_CMD_IDLE && dev->rqs[rq->tag] == rq)
		seq_printf(m, ", .abuse_handle=%#llx", abuse_handle(dev, rq));
	if (cmd->holder)
		seq_printf(m, ", .abuse_holder=%llu, .abuse_holder_pid=%d, .abuse_held_ms=%u",
			   cmd->holder->id, pid_vnr(cmd->holder->owner),
			   jiffies_to_msecs(jiffies - cmd->handed_out));
	spin_unlock_irqrestore(&dev->lock, flags);
}
#endif

static const struct blk_mq_ops abuse_mq_ops = {
	.queue_rq	= abuse_queue_rq,
	.timeout	= abuse_timeout,
	.init_request	= abuse_init_request,
#ifdef CONFIG_BLK_DEBUG_FS
	.show_rq	= abuse_show_rq,
#endif
};

/* Refuse new openers of a disk being destroyed.  Under disk->open_mutex. */
static int abuse_disk_open(struct gendisk *disk)
{
	struct abuse_device *dev = disk->private_data;
	bool dead;

	abuse_selftest_open();
	spin_lock_irq(&dev->lock);
	dead = dev->dead;
	spin_unlock_irq(&dev->lock);
	return dead ? -ENXIO : 0;
}

static void abuse_dev_release(struct kref *kref)
{
	struct abuse_device *dev = container_of(kref, struct abuse_device,
						kref);

	hrtimer_cancel(&dev->wake_timer);
	blk_mq_free_tag_set(&dev->tag_set);
	kfree(dev->gens);
	kfree(dev->rqs);
	kfree(dev);
}

static void abuse_free_disk(struct gendisk *disk)
{
	struct abuse_device *dev = disk->private_data;

	kref_put(&dev->kref, abuse_dev_release);
}

static const struct block_device_operations abuse_bdev_ops = {
	.owner		= THIS_MODULE,
	.open		= abuse_bdev_open,
	.free_disk	= abuse_free_disk,
};

/*
 * /sys/block/abuseN/abuse/<name>: each counter of dev->stats, and each
 * field of dev->config (what the disk is), readable by anyone.
 */
#define ABUSE_ATTR(name, field, fmt)					\
static ssize_t name##_show(struct device *d,				\
			   struct device_attribute *attr, char *buf)	\
{									\
	struct abuse_device *dev = dev_to_disk(d)->private_data;	\
	u64 val;							\
									\
	spin_lock_irq(&dev->lock);					\
	abuse_take_submitted(dev);	/* for a true queued count */	\
	val = (field);							\
	spin_unlock_irq(&dev->lock);					\
	return sysfs_emit(buf, fmt "\n", val);				\
}									\
static DEVICE_ATTR_RO(name)

/* @field reads dev, the disk of the attribute's own device. */
#define ABUSE_COUNTER_ATTR(name)	ABUSE_ATTR(name, dev->stats.name, "%llu")
#define ABUSE_CONFIG_ATTR(name, fmt)	ABUSE_ATTR(name, dev->config.name, fmt)

ABUSE_COUNTER_ATTR(queued);
ABUSE_COUNTER_ATTR(in_flight);
ABUSE_COUNTER_ATTR(completed);
ABUSE_COUNTER_ATTR(errors);
ABUSE_COUNTER_ATTR(requeued);
ABUSE_COUNTER_ATTR(timeouts);
ABUSE_COUNTER_ATTR(rejected);
ABUSE_COUNTER_ATTR(attached);
ABUSE_COUNTER_ATTR(bytes_read);
ABUSE_COUNTER_ATTR(bytes_written);
ABUSE_COUNTER_ATTR(fenced);

ABUSE_CONFIG_ATTR(block_size, "%llu");
ABUSE_CONFIG_ATTR(size, "%llu");
ABUSE_CONFIG_ATTR(flags, "0x%llx");
ABUSE_CONFIG_ATTR(queue_depth, "%llu");
ABUSE_CONFIG_ATTR(max_request_bytes, "%llu");
ABUSE_CONFIG_ATTR(timeout_ms, "%llu");
ABUSE_CONFIG_ATTR(retries, "%llu");

/* The pids serving the disk: one per attached file, see abuse.h. */
static ssize_t workers_show(struct device *d, struct device_attribute *attr,
			    char *buf)
{
	struct abuse_device *dev = dev_to_disk(d)->private_data;
	struct abuse_worker *w;
	int len = 0;

	spin_lock_irq(&dev->lock);
	list_for_each_entry(w, &dev->workers, node)
		len += sysfs_emit_at(buf, len, "%s%d", len ? " " : "",
				     pid_vnr(w->owner));
	spin_unlock_irq(&dev->lock);
	return len + sysfs_emit_at(buf, len, "\n");
}
static DEVICE_ATTR_RO(workers);

static ssize_t lock_stats_show(struct device *d, struct device_attribute *attr,
			       char *buf)
{
	struct abuse_device *dev = dev_to_disk(d)->private_data;
	u64 taken, ns;

	spin_lock_irq(&dev->lock);
	taken = dev->lock_taken;
	ns = dev->lock_ns;
	spin_unlock_irq(&dev->lock);
	return sysfs_emit(buf, "%llu %llu\n", taken, ns);
}
static DEVICE_ATTR_RO(lock_stats);

/* Wake-ups, sleeps and polls of the disk's workers: "name count" lines. */
static ssize_t dispatch_show(struct device *d, struct device_attribute *attr,
			     char *buf)
{
	struct abuse_device *dev = dev_to_disk(d)->private_data;
	int i, len = 0;

	for (i = 0; i < ABUSE_DS_COUNT; i++)
		len += sysfs_emit_at(buf, len, "%s %ld\n",
				     abuse_dispatch_names[i],
				     atomic_long_read(&dev->dispatch[i]));
	return len;
}
static DEVICE_ATTR_RO(dispatch);

static struct attribute *abuse_disk_attrs[] = {
	&dev_attr_queued.attr,
	&dev_attr_in_flight.attr,
	&dev_attr_completed.attr,
	&dev_attr_errors.attr,
	&dev_attr_requeued.attr,
	&dev_attr_timeouts.attr,
	&dev_attr_rejected.attr,
	&dev_attr_attached.attr,
	&dev_attr_bytes_read.attr,
	&dev_attr_bytes_written.attr,
	&dev_attr_fenced.attr,
	&dev_attr_block_size.attr,
	&dev_attr_size.attr,
	&dev_attr_flags.attr,
	&dev_attr_queue_depth.attr,
	&dev_attr_max_request_bytes.attr,
	&dev_attr_timeout_ms.attr,
	&dev_attr_retries.attr,
	&dev_attr_workers.attr,
	&dev_attr_lock_stats.attr,
	&dev_attr_dispatch.attr,
	NULL,
};

static const struct attribute_group abuse_disk_group = {
	.name	= "abuse",
	.attrs	= abuse_disk_attrs,
};

static const struct attribute_group *abuse_disk_groups[] = {
	&abuse_disk_group,
	NULL,
};

/* ---------------------------------------------------------------------
 * Data copies between request pages and worker buffers.  The request
 * is BUSY and owned by the caller, so its pages cannot go away.
 */

/* Worker pages a copy pins at once (their pointers live on the stack). */
#define ABUSE_PIN_PAGES		32

/*
 * A window of the worker's pages, pinned for one copy as O_DIRECT pins
 * them, so that the copy is a memcpy between kernel mappings instead of
 * copy_{to,from}_user().  In the benchmark's emulated guest that cut the
 * worker's CPU time per 1 MiB request fourfold (6.1 and 6.12); pinning
 * costs one page-table walk per window.
 */
struct abuse_pinned {
	struct page *pages[ABUSE_PIN_PAGES];
	unsigned long start;	/* user address of pages[0] */
	int nr;			/* pages pinned */
	bool write;		/* the copy writes to the worker's pages */
};

static void abuse_unpin(struct abuse_pinned *pin)
{
	if (pin->nr)
		unpin_user_pages_dirty_lock(pin->pages, pin->nr, pin->write);
	pin->nr = 0;
}

/*
 * The worker's page at user address @addr, pinning the window from it
 * up to @end if it is not pinned yet.  NULL if it cannot be pinned: not
 * mapped, or not writable when @pin->write.  May sleep (faults).
 */
static struct page *abuse_pinned_page(struct abuse_pinned *pin,
				      unsigned long addr, unsigned long end)
{
	unsigned long first = addr & PAGE_MASK;
	int want, got;

	if (pin->nr && first >= pin->start &&
	    first - pin->start < (unsigned long)pin->nr << PAGE_SHIFT)
		return pin->pages[(first - pin->start) >> PAGE_SHIFT];

	abuse_unpin(pin);
	want = min_t(unsigned long, ABUSE_PIN_PAGES,
		     DIV_ROUND_UP(end - first, PAGE_SIZE));
	got = pin_user_pages_fast(first, want, pin->write ? FOLL_WRITE : 0,
				  pin->pages);
	if (got <= 0)
		return NULL;
	pin->start = first;
	pin->nr = got;
	return pin->pages[0];
}

/*
 * Copy @rq's data to the worker's memory at @uaddr, or from it.
 * May sleep.
 */
static int abuse_copy_rq(struct request *rq, u64 uaddr, bool to_worker)
{
	struct abuse_pinned pin = { .write = to_worker };
	unsigned long addr = uaddr;
	unsigned long end = addr + blk_rq_bytes(rq);
	struct req_iterator iter;
	struct bio_vec bv;
	int err = 0;

	if (end < addr)
		return -EFAULT;
	/* Single-page segments: each fits in one page of the request. */
	rq_for_each_segment(bv, rq, iter) {
		unsigned int done = 0;

		while (done < bv.bv_len) {
			struct page *upage = abuse_pinned_page(&pin, addr, end);
			unsigned int uoff = offset_in_page(addr);
			unsigned int len = min_t(unsigned int, bv.bv_len - done,
						 PAGE_SIZE - uoff);

			if (!upage) {
				err = -EFAULT;
				goto out;
			}
			if (to_worker) {
				memcpy_page(upage, uoff, bv.bv_page,
					    bv.bv_offset + done, len);
				flush_dcache_page(upage);
			} else {
				memcpy_page(bv.bv_page, bv.bv_offset + done,
					    upage, uoff, len);
				flush_dcache_page(bv.bv_page);
			}
			done += len;
			addr += len;
		}
	}
out:
	abuse_unpin(&pin);
	return err;
}

/* ---------------------------------------------------------------------
 * GET and PUT
 */

static void abuse_describe(struct abuse_device *dev, struct request *rq,
			   u64 data, struct abuse_request *desc)
{
	memset(desc, 0, sizeof(*desc));
	desc->handle = abuse_handle(dev, rq);
	desc->offset = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;
	desc->length = blk_rq_bytes(rq);
	desc->data = data;
	if (rq->cmd_flags & REQ_FUA)
		desc->flags |= ABUSE_REQ_FUA;

	switch (req_op(rq)) {
	case REQ_OP_READ:
		desc->op = ABUSE_OP_READ;
		break;
	case REQ_OP_WRITE:
		desc->op = ABUSE_OP_WRITE;
		break;
	case REQ_OP_FLUSH:
		desc->op = ABUSE_OP_FLUSH;
		break;
	case REQ_OP_DISCARD:
		desc->op = ABUSE_OP_DISCARD;
		break;
	default:
		desc->op = ABUSE_OP_WRITE_ZEROES;
		break;
	}
}

/* Buffer bytes a request needs: reads and writes carry data. */
static u64 abuse_buffer_need(struct request *rq)
{
	return round_up((u64)abuse_payload(rq), ABUSE_DATA_ALIGN);
}

/* Whether the queue holds more data than one GET takes (share_kib). */
static bool abuse_queue_to_share(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	return dev->queued_bytes >= abuse_share_bytes();
}

/*
 * Whether the queue is to be shared (abuse_queue_to_share) and a sleeper
 * woken for it now: copies of big requests take long enough for a
 * second worker to halve them.  One wake-up at a time
 * (ABUSE_DEV_WAKING): the woken one passes the next on if a share is
 * still left.
 */
static bool abuse_share(struct abuse_device *dev)
	__must_hold(&dev->lock)
{
	return abuse_queue_to_share(dev) && wq_has_sleeper(&dev->get_wait) &&
	       !test_and_set_bit(ABUSE_DEV_WAKING, &dev->flags);
}

/*
 * Whether @w, back for more with nothing in hand, should leave the
 * queue to the lead (see "Dispatch"): the lead runs on a CPU and keeps
 * up (abuse_workers_short).  If so, the wake timer is armed for the
 * oldest request, so that a sleeper is woken if the lead stops keeping
 * up.
 */
static bool abuse_defer(struct abuse_device *dev, struct abuse_worker *w)
	__must_hold(&dev->lock)
{
	struct abuse_cmd *head;
	u64 bound;

	head = list_first_entry_or_null(&dev->queue, struct abuse_cmd, node);
	bound = abuse_wake_bound(dev);
	if (!head || !bound || dev->lead == w ||
	    abuse_queue_to_share(dev) ||
	    abuse_workers_short(dev, local_clock(), bound) ||
	    !abuse_worker_computes(dev->lead) ||
	    !abuse_worker_running(dev->lead))
		return false;
	abuse_arm_wake_timer(dev, head->queued_ns + bound);
	return true;
}

/*
 * Hand out up to ABUSE_GET_CHUNK queued requests into @x from slot *@n,
 * taking dev->lock twice for all of them: once to take them from the
 * queue, once to mark them in flight after their payloads were copied.
 * *@payload counts the data this GET took; past share_kib it
 * leaves the rest to a sleeper, if there is one.  *@arrived gets the
 * queued_ns of the GET's first request (abuse_note_gap).
 * Returns how many were delivered (*@n grows by as many), 0 if nothing
 * is queued or fits, or if it left the queue to the lead (*@deferred
 * set; only if @deferred is not NULL), -EAGAIN if all it took were
 * failed meanwhile (by RESET or DESTROY: try again), or a negative
 * errno if it delivered none.  May sleep (copies).
 */
static int abuse_get_chunk(struct abuse_device *dev, struct abuse_worker *w,
			   struct abuse_xfer *x, u32 *n, u64 *used,
			   u64 *payload, u64 *arrived, bool *deferred)
{
	struct abuse_request __user *udesc = u64_to_user_ptr(x->requests);
	u64 __user *utokens = u64_to_user_ptr(x->tokens);
	u32 want = min_t(u32, x->max_requests - *n, ABUSE_GET_CHUNK);
	u64 share = abuse_share_bytes();
	struct abuse_request descs[ABUSE_GET_CHUNK];
	struct request *rqs[ABUSE_GET_CHUNK];
	u64 tokens[ABUSE_GET_CHUNK];
	int errs[ABUSE_GET_CHUNK];
	u32 i, taken = 0, delivered = 0, requeued = 0;
	bool failed_some = false;
	LIST_HEAD(failed);
	int ret = 0;

	abuse_lock(dev);
	abuse_take_submitted(dev);
	if (dev->dead)
		ret = -ENODEV;
	else if (w->fenced)
		ret = -ESHUTDOWN;
	else if (deferred && !*n && abuse_defer(dev, w))
		*deferred = true;
	while (!ret && !(deferred && *deferred) && taken < want) {
		struct abuse_cmd *cmd;
		struct request *rq;
		u64 need, data;

		cmd = list_first_entry_or_null(&dev->queue, struct abuse_cmd,
					       node);
		if (!cmd)
			break;
		if (*payload >= share &&
		    wq_has_sleeper(&dev->get_wait))
			break;
		rq = blk_mq_rq_from_pdu(cmd);
		need = abuse_buffer_need(rq);
		if (x->flags & ABUSE_XFER_MAPPED) {
			/*
			 * In place, for reads and writes (a flush has no
			 * position).  Out of range only if the check at
			 * entry raced with a grow.
			 */
			u64 pos = (u64)blk_rq_pos(rq) << SECTOR_SHIFT;

			if (need && (pos > x->buffer_size ||
				     blk_rq_bytes(rq) > x->buffer_size - pos)) {
				ret = *n + taken ? 0 : -ENOBUFS;
				break;
			}
			data = need ? x->buffer + pos : 0;
			need = 0;
		} else {
			if (need > x->buffer_size - *used) {
				ret = *n + taken ? 0 : -ENOBUFS;
				break;
			}
			data = need ? x->buffer + *used : 0;
		}
		if (!*n && !taken)
			*arrived = cmd->queued_ns;
		abuse_set_state(dev, rq, ABUSE_CMD_BUSY);
		dev->gens[rq->tag]++;
		cmd->holder = w;
		cmd->handed_out = jiffies;
		tokens[taken] = ++dev->last_token;
		abuse_describe(dev, rq, data, &descs[taken]);
		*used += need;
		*payload += abuse_payload(rq);
		rqs[taken++] = rq;
	}
	if (taken) {
		dev->lead = w;
		/*
		 * Busy from the first take on, not from the end of the GET:
		 * requests that come while it copies this batch wait for it
		 * lazily instead of waking another worker at once.
		 */
		if (!*n)
			abuse_set_serving(dev, w, true);
		/* with dev->lead, at every take: another GET may take between chunks */
		WRITE_ONCE(dev->lead_blocks, !abuse_worker_computes(w));
	}
	abuse_unlock(dev);
	if (!taken)
		return ret;

	/* Each write's payload, from the request into the worker's memory. */
	for (i = 0; i < taken; i++) {
		errs[i] = 0;
		if (req_op(rqs[i]) == REQ_OP_WRITE)
			errs[i] = abuse_copy_rq(rqs[i], descs[i].data, true);
	}

	ret = 0;
	abuse_lock(dev);
	for (i = 0; i < taken; i++) {
		struct abuse_cmd *cmd = abuse_cmd(rqs[i]);

		if (cmd->fail_pending) {
			abuse_retire(dev, rqs[i], BLK_STS_IOERR);
			list_add_tail(&cmd->node, &failed);
			failed_some = true;
		} else if (errs[i] || ret) {
			/* From the first fault on, the batch ends there. */
			abuse_requeue(dev, rqs[i]);
			requeued++;
			ret = ret ?: errs[i];
		} else {
			abuse_set_state(dev, rqs[i], ABUSE_CMD_IN_FLIGHT);
			rqs[delivered] = rqs[i];
			descs[delivered] = descs[i];
			tokens[delivered] = tokens[i];
			delivered++;
		}
	}
	abuse_unlock(dev);
	abuse_end_list(&failed);
	if (requeued)
		abuse_wake(dev, requeued, ABUSE_DS_WAKE_PASSED);

	/* Tell the worker; a worker that cannot be told gets nothing. */
	if (delivered &&
	    (copy_to_user(&udesc[*n], descs, delivered * sizeof(descs[0])) ||
	     (x->flags & ABUSE_XFER_TOKENS &&
	      copy_to_user(&utokens[*n], tokens,
			   delivered * sizeof(tokens[0]))))) {
		requeued = 0;
		abuse_lock(dev);
		for (i = 0; i < delivered; i++) {
			struct abuse_cmd *cmd = abuse_cmd(rqs[i]);

			/* Unless a timeout or RESET took it meanwhile. */
			if (cmd->state == ABUSE_CMD_IN_FLIGHT &&
			    cmd->holder == w &&
			    descs[i].handle == abuse_handle(dev, rqs[i])) {
				abuse_requeue(dev, rqs[i]);
				requeued++;
			}
		}
		abuse_unlock(dev);
		if (requeued)
			abuse_wake(dev, requeued, ABUSE_DS_WAKE_PASSED);
		return -EFAULT;
	}
	*n += delivered;
	if (delivered)
		return delivered;
	if (ret)
		return ret;
	return failed_some ? -EAGAIN : 0;
}

/* Without dev->lock: whether a GET would find something, or the end. */
static bool abuse_has_work(struct abuse_device *dev)
{
	return READ_ONCE(dev->stats.queued) ||
	       !llist_empty(&dev->submitted) || READ_ONCE(dev->dead);
}

/*
 * Hybrid polling: before a GET sleeps, poll for the next request for a
 * while, since at low queue depth it usually comes a few microseconds
 * after the previous answer, and a sleep and wake-up cost more than
 * that.  The budget is twice this worker's recent waits (gap_ns), at
 * most spin_max_us, and nothing once they average more than that, so a
 * disk that goes idle stops polling on its own; one poller per disk,
 * and never past need_resched() or a signal.  A wait counts until the
 * request came (abuse_note_gap), not until a sleeper woke to take it:
 * otherwise the wake-up's own latency lengthened every wait after a
 * sleep, and on a slow machine one stretch of sleeps kept polling off
 * for good.
 *
 * Only while no other task waits for this CPU (single_task_running(),
 * as KVM's halt polling does): at queue depth 1 the task woken here is
 * often the submitter itself, and it may wait out our budget, since
 * the scheduler need not preempt us at once (EEVDF on 6.6+ lets us run
 * to parity): polling would delay the very request we poll for.
 * Returns true if work came.
 */
static bool abuse_spin_for_work(struct abuse_device *dev,
				struct abuse_worker *w)
{
	u64 max = (u64)READ_ONCE(spin_max_us) * NSEC_PER_USEC;
	u64 gap = READ_ONCE(w->gap_ns);
	u64 budget = min_t(u64, 2 * gap, max);
	u64 start, now;

	/* Work usually comes later than we may poll: do not poll at all. */
	if (!budget || gap > max || !single_task_running())
		return false;
	spin_lock_irq(&dev->lock);
	if (dev->spinner) {
		spin_unlock_irq(&dev->lock);
		return false;
	}
	WRITE_ONCE(dev->spinner, w);
	spin_unlock_irq(&dev->lock);
	abuse_count(dev, ABUSE_DS_POLLS, 1);

	start = local_clock();
	do {
		if (abuse_has_work(dev))
			break;
		cpu_relax();
		now = local_clock();
	} while (abuse_ns_since(start, now) < budget && !need_resched() &&
		 single_task_running() && !signal_pending(current));

	/*
	 * queue_rq woke nobody while we polled: look once more under the
	 * lock, after which it wakes sleepers again.
	 */
	spin_lock_irq(&dev->lock);
	WRITE_ONCE(dev->spinner, NULL);
	spin_unlock_irq(&dev->lock);
	/* Pairs with llist_add() in queue_rq, then its read of spinner. */
	smp_mb();
	if (!abuse_has_work(dev))
		return false;
	abuse_count(dev, ABUSE_DS_POLL_HITS, 1);
	return true;
}

/*
 * Put @w's @wait on the GET sleepers: at the head, marked, if @w is the
 * lead, else at the head but behind a marked lead.  Also for an entry
 * reused after a wake-up, whose mark is set afresh.  (dev->lead is
 * dev->lock's; a racy read only places us.)
 */
static void abuse_add_sleeper(struct abuse_device *dev, struct abuse_worker *w,
			      struct wait_queue_entry *wait)
	__must_hold(&dev->get_wait.lock)
{
	struct list_head *head = &dev->get_wait.head;
	struct wait_queue_entry *first;

	first = list_first_entry_or_null(&dev->get_wait.head,
					 struct wait_queue_entry, entry);
	wait->flags = WQ_FLAG_EXCLUSIVE;
	if (READ_ONCE(dev->lead) == w)
		wait->flags |= ABUSE_WQ_LEAD;
	else if (first && first->flags & ABUSE_WQ_LEAD)
		head = &first->entry;
	list_add(&wait->entry, head);
}

/*
 * Sleep until @dev has work, a signal arrives or @timeout jiffies pass.
 * Exclusive: queue_rq wakes one sleeper per request, not a herd.  The
 * lead (the last worker to take a batch), still warm, waits at the head
 * and takes the next request; the others wait behind it, the last to
 * sleep first (LIFO, as epoll_wait()), and sleep on while it keeps up.
 * (FIFO passed each request of a QD1 stream to the other worker of two,
 * which halved the IOPS; plain LIFO let a worker back from an idle
 * timeout jump ahead of the lead, so the workers took turns, each one
 * cold.)  A worker that @deferred to the lead waits for a wake-up
 * instead of work: the queue has work, left to the lead, and the wake
 * timer armed for it (abuse_defer) wakes us if it gets late.
 * @w stops counting as busy only once it is on the wait queue: a
 * request that comes earlier waits for it as for a busy worker, one
 * that comes later wakes it (the lead: at the head), not a cold sleeper
 * (which then kept serving beside it).
 * Returns the jiffies left (0 once timed out) or -ERESTARTSYS.  May
 * sleep.
 */
static long abuse_wait_work(struct abuse_device *dev, struct abuse_worker *w,
			    long timeout, bool deferred)
{
	DEFINE_WAIT(wait);
	bool woken = false;

	for (;;) {
		/* prepare_to_wait_exclusive(), the lead first */
		spin_lock_irq(&dev->get_wait.lock);
		if (list_empty(&wait.entry))
			abuse_add_sleeper(dev, w, &wait);
		set_current_state(TASK_INTERRUPTIBLE);
		spin_unlock_irq(&dev->get_wait.lock);
		abuse_set_serving(dev, w, false);
		/*
		 * Pairs with llist_add(), then the read of nr_serving, in
		 * queue_rq (abuse_enqueued): it sees us idle, or we see its
		 * request.
		 */
		smp_mb();
		if ((deferred ? woken || READ_ONCE(dev->dead) :
				abuse_has_work(dev)) || !timeout)
			break;
		if (signal_pending(current)) {
			timeout = -ERESTARTSYS;
			break;
		}
		abuse_count(dev, ABUSE_DS_SLEEPS, 1);
		timeout = schedule_timeout(timeout);
		woken = true;
	}
	finish_wait(&dev->get_wait, &wait);
	return timeout;
}

/*
 * Fold one wait for work, @ns long, into @w's polling budget: from the
 * GET finding the queue empty to the arrival of the request it then
 * took (queued_ns, stamped by queue_rq on the submitter's CPU;
 * local_clock() is close enough across CPUs for a hint), or to the
 * timeout if none came.
 */
static void abuse_note_gap(struct abuse_worker *w, u64 ns)
{
	u64 cap = 4ULL * READ_ONCE(spin_max_us) * NSEC_PER_USEC;

	abuse_fold(&w->gap_ns, min(ns, cap), 8);
}

/*
 * The GET half: fill up to x->max_requests descriptors.  Blocks while
 * nothing is queued unless ABUSE_XFER_NOWAIT, or for x->timeout_ms at
 * most with ABUSE_XFER_TIMEOUT.  An error after the first descriptor
 * ends the batch early instead; the caller gets what it has.
 */
static int abuse_get(struct abuse_device *dev, struct abuse_worker *w,
		     struct abuse_xfer *x)
{
	struct pid *me = task_tgid(current);
	long wait = MAX_SCHEDULE_TIMEOUT;
	u64 used = 0, payload = 0, waiting = 0, arrived = 0;
	struct abuse_cmd *head;
	bool leftover, deferred, may_defer, woken = false;
	u32 n = 0;
	int ret = 0;

	if (x->flags & ABUSE_XFER_NOWAIT)
		wait = 0;
	else if (x->flags & ABUSE_XFER_TIMEOUT)
		wait = msecs_to_jiffies(x->timeout_ms);
	/*
	 * Only a GET that may wait leaves work to the lead, and it still
	 * does once its wait ran out: it then returns empty.  An idle
	 * worker's GET times out every few hundred ms, and taking what was
	 * queued behind a lead that keeps up made it the lead; at 1M this
	 * moved the work between workers up to 12 times per 1,000 requests,
	 * and four workers ran at 0.86-0.92x of one (docs/SCALING.md).
	 */
	may_defer = wait;
	WRITE_ONCE(w->batch_max, x->max_requests);

	/* The fence kills whoever GETs on this file last. */
	if (x->max_requests && READ_ONCE(w->owner) != me) {
		struct pid *old;

		spin_lock_irq(&dev->lock);
		old = w->owner;
		w->owner = get_pid(me);
		spin_unlock_irq(&dev->lock);
		put_pid(old);
	}

	/*
	 * Back from serving a batch: whether it blocked meanwhile (its
	 * backend waited), for abuse_worker_computes.  Measured from the
	 * batch's GET to this call, so also for a worker that sleeps in GET
	 * between batches (a slow backend at a shallow queue).
	 */
	if (w->handed_out) {
		abuse_fold(&w->cycle_blocks, current->nvcsw != w->nvcsw_out ?
			   ABUSE_ONE : 0, 16);
		w->handed_out = false;
	}

	x->nr_requests = 0;
	while (x->max_requests) {
		deferred = false;
		while (n < x->max_requests) {
			ret = abuse_get_chunk(dev, w, x, &n, &used, &payload, &arrived,
					      may_defer ? &deferred : NULL);
			if (ret == -EAGAIN)
				continue;
			/* A short chunk emptied the queue: no need to look again. */
			if (ret <= 0 || ret < ABUSE_GET_CHUNK)
				break;
		}
		/*
		 * Woken, we have now looked at the queue: from here the next
		 * request wakes another sleeper if need be.  Cleared after
		 * the take, not when the sleep ends: a request queued in
		 * between is taken with this batch, and would otherwise wake
		 * a second worker for the same burst.  Either queue_rq sees
		 * the bit clear and wakes a sleeper, or the check for work
		 * left behind below (or the look before sleeping) sees its
		 * request.
		 */
		if (woken) {
			clear_bit(ABUSE_DEV_WAKING, &dev->flags);
			/* Pairs with llist_add(), then test_and_set_bit(), in queue_rq. */
			smp_mb__after_atomic();
			woken = false;
		}
		if (n || ret < 0)
			break;
		if (deferred)
			abuse_count(dev, ABUSE_DS_DEFERRED, 1);
		if (!wait)
			break;
		if (!waiting)
			waiting = local_clock();
		/*
		 * Nothing to take.  While we poll we still count as busy, so
		 * that what is queued meanwhile waits for us instead of waking
		 * a sleeper; then we are not busy any more, and the next
		 * request wakes one (maybe us: we look before we sleep).
		 */
		if (!deferred && abuse_spin_for_work(dev, w))
			continue;
		wait = abuse_wait_work(dev, w, wait, deferred);
		/* Woken (or not: a hint), we look at the queue next. */
		woken = true;
		if (wait < 0) {
			clear_bit(ABUSE_DEV_WAKING, &dev->flags);
			ret = wait;
			break;
		}
	}
	if (waiting)
		abuse_note_gap(w, abuse_ns_since(waiting, n ? arrived :
							 local_clock()));
	/* With a batch, busy since its first take (abuse_get_chunk). */
	if (n) {
		abuse_count(dev, ABUSE_DS_BATCHES, 1);
		w->nvcsw_out = current->nvcsw;
		w->handed_out = true;
	} else {
		abuse_set_serving(dev, w, false);
	}

	/*
	 * Work left behind: pass the wake-up on, at once for a share of big
	 * requests (abuse_share), else as queue_rq would (abuse_enqueued):
	 * lazily if we now hold a batch and compute, since we may well take
	 * it ourselves.
	 */
	if (abuse_has_work(dev)) {
		spin_lock_irq(&dev->lock);
		abuse_take_submitted(dev);
		head = list_first_entry_or_null(&dev->queue, struct abuse_cmd,
						node);
		leftover = head && (abuse_share(dev) ||
				    abuse_enqueued(dev, head->queued_ns));
		spin_unlock_irq(&dev->lock);
		if (leftover)
			abuse_wake(dev, 1, ABUSE_DS_WAKE_PASSED);
	}

	x->nr_requests = n;
	return n ? 0 : ret;
}

/* Whether @rq is among the first @n of @rqs. */
static bool abuse_in_chunk(struct request **rqs, u32 n, struct request *rq)
{
	u32 i;

	for (i = 0; i < n; i++)
		if (rqs[i] == rq)
			return true;
	return false;
}

/* Check @reply's own fields; 0 and its status in *@status, or -EINVAL. */
static int abuse_check_reply(const struct abuse_reply *reply,
			     blk_status_t *status)
{
	if (reply->__reserved || reply->result > 0 ||
	    reply->result < -MAX_ERRNO)
		return -EINVAL;
	*status = errno_to_blk_status(reply->result);
	return 0;
}

/*
 * Answer the *@countp replies of @chunk (fewer if one names a request
 * named before it: *@countp says how many), each with its own status (see
 * abuse_reply), taking dev->lock twice for all of them: once to check
 * each and end those with nothing to copy, once after copying the reads'
 * data in.  Returns how many were accepted.  May sleep (copies).
 */
static u32 abuse_put_chunk(struct abuse_device *dev, struct abuse_worker *w,
			   struct abuse_reply *chunk, u32 *countp)
{
	u32 count = *countp;
	struct request *rqs[ABUSE_PUT_CHUNK];
	blk_status_t sts[ABUSE_PUT_CHUNK];
	bool copy[ABUSE_PUT_CHUNK];
	u32 i, accepted = 0, rejected = 0;
	bool copies = false;

	for (i = 0; i < count; i++) {
		rqs[i] = NULL;
		copy[i] = false;
		chunk[i].status = abuse_check_reply(&chunk[i], &sts[i]);
	}

	abuse_lock(dev);
	for (i = 0; i < count; i++) {
		u32 tag = lower_32_bits(chunk[i].handle);
		struct request *rq;
		struct abuse_cmd *cmd;

		if (chunk[i].status) {
			rejected++;
			continue;
		}
		rq = tag < dev->config.queue_depth ? dev->rqs[tag] : NULL;
		cmd = rq ? abuse_cmd(rq) : NULL;
		if (rq && abuse_in_chunk(rqs, i, rq)) {
			/*
			 * The same request again in this chunk: answer it
			 * after the earlier entry is done, in the next chunk,
			 * so that entries are judged in order.
			 */
			count = i;
			break;
		}
		/*
		 * Only the file that took a request answers it: another
		 * file's PUT of a live handle would end it behind its
		 * holder's back.
		 */
		if (!rq || cmd->state != ABUSE_CMD_IN_FLIGHT ||
		    cmd->holder != w ||
		    chunk[i].handle != abuse_handle(dev, rq)) {
			chunk[i].status = -ESTALE;
			rejected++;
		} else if (chunk[i].length != blk_rq_bytes(rq)) {
			chunk[i].status = -EINVAL;
			rejected++;
		} else if (req_op(rq) == REQ_OP_READ && sts[i] == BLK_STS_OK) {
			abuse_set_state(dev, rq, ABUSE_CMD_BUSY);
			rqs[i] = rq;
			copy[i] = true;
			copies = true;
		} else {
			abuse_retire(dev, rq, sts[i]);
			rqs[i] = rq;
		}
	}
	dev->stats.rejected += rejected;
	abuse_unlock(dev);
	*countp = count;

	for (i = 0; i < count; i++) {
		if (rqs[i] && !copy[i]) {
			abuse_end_request(rqs[i], sts[i]);
			accepted++;
		}
	}
	if (!copies)
		return accepted;

	/* A read's data, from the worker's memory into the request. */
	for (i = 0; i < count; i++)
		if (copy[i])
			chunk[i].status = abuse_copy_rq(rqs[i], chunk[i].data,
							false);

	rejected = 0;
	abuse_lock(dev);
	for (i = 0; i < count; i++) {
		struct abuse_cmd *cmd;

		if (!copy[i])
			continue;
		cmd = abuse_cmd(rqs[i]);
		if (!cmd->fail_pending && chunk[i].status) {
			/* Keep it; its holder, this live file, may PUT it again. */
			abuse_set_state(dev, rqs[i], ABUSE_CMD_IN_FLIGHT);
			copy[i] = false;
			rejected++;
			continue;
		}
		if (cmd->fail_pending) {
			/* Failed by RESET or DESTROY meanwhile: the answer is late. */
			sts[i] = BLK_STS_IOERR;
			chunk[i].status = -ESTALE;
			rejected++;
		}
		abuse_retire(dev, rqs[i], sts[i]);
	}
	dev->stats.rejected += rejected;
	abuse_unlock(dev);

	for (i = 0; i < count; i++) {
		if (copy[i]) {
			abuse_end_request(rqs[i], sts[i]);
			accepted += !chunk[i].status;
		}
	}
	return accepted;
}

/*
 * Whether each of the @n entries at @ureply can be read and its status
 * written, found before any is answered: a PUT that failed part way
 * would leave its caller not knowing which answers were taken.  Each
 * entry's first and last words are read (an entry spans two pages at
 * most) and its status written back unchanged.  Only a thread that
 * unmaps the array meanwhile can still make a PUT fail part way.
 */
static int abuse_replies_reachable(struct abuse_reply __user *ureply, u32 n)
{
	u64 first;
	u32 last;
	s32 status;
	u32 i;

	if (!user_access_begin(ureply, (size_t)n * sizeof(*ureply)))
		return -EFAULT;
	for (i = 0; i < n; i++) {
		unsafe_get_user(first, &ureply[i].handle, efault);
		unsafe_get_user(last, &ureply[i].__reserved, efault);
		unsafe_get_user(status, &ureply[i].status, efault);
		unsafe_put_user(status, &ureply[i].status, efault);
	}
	user_access_end();
	return 0;
efault:
	user_access_end();
	return -EFAULT;
}

/* The PUT half: answer x->nr_replies entries, each with its own status. */
static int abuse_put(struct abuse_device *dev, struct abuse_worker *w,
		     struct abuse_xfer *x)
{
	struct abuse_reply __user *ureply = u64_to_user_ptr(x->replies);
	struct abuse_reply chunk[ABUSE_PUT_CHUNK];
	u32 done, i, count;

	x->nr_accepted = 0;
	if (x->nr_replies && abuse_replies_reachable(ureply, x->nr_replies))
		return -EFAULT;
	for (done = 0; done < x->nr_replies; done += count) {
		count = min_t(u32, x->nr_replies - done, ABUSE_PUT_CHUNK);
		if (copy_from_user(chunk, &ureply[done],
				   count * sizeof(chunk[0])))
			return -EFAULT;
		/* Takes fewer than @count if a handle repeats. */
		x->nr_accepted += abuse_put_chunk(dev, w, chunk, &count);
		for (i = 0; i < count; i++)
			if (put_user(chunk[i].status,
				     &ureply[done + i].status))
				return -EFAULT;
	}
	return 0;
}

/* ---------------------------------------------------------------------
 * Control device
 */

/* Look up disk @index.  Must hold abuse_ctl_mutex. */
static struct abuse_device *abuse_find(u32 index)
{
	lockdep_assert_held(&abuse_ctl_mutex);
	if (index > INT_MAX)
		return NULL;
	return idr_find(&abuse_index_idr, index);
}

static bool abuse_reserved_zero(const __u64 *reserved, size_t count)
{
	size_t i;

	for (i = 0; i < count; i++)
		if (reserved[i])
			return false;
	return true;
}

/* Check @cfg for CREATE and fill in defaults. */
static int abuse_check_config(struct abuse_config *cfg)
{
	if (!abuse_reserved_zero(cfg->__reserved, ARRAY_SIZE(cfg->__reserved)))
		return -EINVAL;
	if (cfg->flags & ~ABUSE_F_ALL)
		return -EINVAL;
	if (cfg->flags & ABUSE_F_INDEX && cfg->index > ABUSE_MAX_INDEX)
		return -EINVAL;
	if (cfg->block_size < ABUSE_MIN_BLOCK_SIZE ||
	    cfg->block_size > ABUSE_MAX_BLOCK_SIZE ||
	    !is_power_of_2(cfg->block_size))
		return -EINVAL;
	if (!cfg->size || cfg->size % cfg->block_size ||
	    (cfg->size >> SECTOR_SHIFT) > (u64)LLONG_MAX >> SECTOR_SHIFT)
		return -EINVAL;

	if (!cfg->queue_depth)
		cfg->queue_depth = ABUSE_DEFAULT_QUEUE_DEPTH;
	if (cfg->queue_depth > ABUSE_MAX_QUEUE_DEPTH)
		return -EINVAL;
	if (!cfg->max_request_bytes)
		cfg->max_request_bytes = ABUSE_DEFAULT_REQUEST_BYTES;
	if (cfg->max_request_bytes < PAGE_SIZE ||
	    cfg->max_request_bytes > ABUSE_MAX_REQUEST_BYTES ||
	    cfg->max_request_bytes % cfg->block_size)
		return -EINVAL;
	if (cfg->timeout_ms > ABUSE_MAX_TIMEOUT_MS ||
	    cfg->retries > ABUSE_MAX_RETRIES)
		return -EINVAL;
	return 0;
}

static int abuse_ctl_create(struct abuse_config *cfg)
{
	struct abuse_device *dev;
	struct gendisk *disk;
	int ret;

	ret = abuse_check_config(cfg);
	if (ret)
		return ret;

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	dev->rqs = kcalloc(cfg->queue_depth, sizeof(*dev->rqs), GFP_KERNEL);
	dev->gens = kcalloc(cfg->queue_depth, sizeof(*dev->gens), GFP_KERNEL);
	if (!dev->rqs || !dev->gens) {
		ret = -ENOMEM;
		goto out_free_rqs;
	}
	kref_init(&dev->kref);
	spin_lock_init(&dev->lock);
	init_waitqueue_head(&dev->get_wait);
	init_waitqueue_head(&dev->poll_wait);
	hrtimer_init(&dev->wake_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	dev->wake_timer.function = abuse_wake_timer_fn;
	atomic_set(&dev->nr_serving, 0);
	INIT_LIST_HEAD(&dev->queue);
	INIT_LIST_HEAD(&dev->workers);
	dev->config = *cfg;
	dev->config.flags &= ~ABUSE_F_INDEX;	/* how it was made, not what it is */

	dev->tag_set.ops = &abuse_mq_ops;
	dev->tag_set.nr_hw_queues = 1;
	dev->tag_set.queue_depth = cfg->queue_depth;
	dev->tag_set.numa_node = NUMA_NO_NODE;
	dev->tag_set.cmd_size = sizeof(struct abuse_cmd);
	dev->tag_set.flags = BLK_MQ_F_SHOULD_MERGE |
			     BLK_MQ_F_NO_SCHED_BY_DEFAULT;
	dev->tag_set.timeout = cfg->timeout_ms ?
			       msecs_to_jiffies(cfg->timeout_ms) :
			       ABUSE_IDLE_TIMER;
	dev->tag_set.driver_data = dev;
	ret = blk_mq_alloc_tag_set(&dev->tag_set);
	if (ret)
		goto out_free_rqs;

	disk = abuse_alloc_disk(dev);
	if (IS_ERR(disk)) {
		ret = PTR_ERR(disk);
		goto out_free_tag_set;
	}
	dev->disk = disk;
	disk->fops = &abuse_bdev_ops;
	disk->private_data = dev;
	set_capacity(disk, cfg->size >> SECTOR_SHIFT);

	mutex_lock(&abuse_ctl_mutex);
	if (cfg->flags & ABUSE_F_INDEX) {
		ret = idr_alloc(&abuse_index_idr, dev, cfg->index,
				cfg->index + 1, GFP_KERNEL);
		if (ret == -ENOSPC)
			ret = -EEXIST;
	} else {
		ret = idr_alloc(&abuse_index_idr, dev, 0, 0, GFP_KERNEL);
	}
	if (ret < 0)
		goto out_unlock;
	dev->config.index = ret;
	cfg->index = ret;
	cfg->flags &= ~ABUSE_F_INDEX;
	snprintf(disk->disk_name, sizeof(disk->disk_name), "abuse%d", ret);

	/*
	 * No partition scan while adding: it would read the disk before
	 * any worker can be attached.  BLKRRPART scans later.
	 */
	set_bit(GD_SUPPRESS_PART_SCAN, &disk->state);
	ret = device_add_disk(NULL, disk, abuse_disk_groups);
	clear_bit(GD_SUPPRESS_PART_SCAN, &disk->state);
	if (ret)
		goto out_remove_index;

	/* Each disk pins the module: rmmod fails while disks exist. */
	__module_get(THIS_MODULE);
	mutex_unlock(&abuse_ctl_mutex);
	return 0;

out_remove_index:
	idr_remove(&abuse_index_idr, dev->config.index);
out_unlock:
	mutex_unlock(&abuse_ctl_mutex);
	put_disk(disk);
out_free_tag_set:
	blk_mq_free_tag_set(&dev->tag_set);
out_free_rqs:
	kfree(dev->gens);
	kfree(dev->rqs);
	kfree(dev);
	return ret;
}

/* Tear down @dev, failing whatever it still holds.  Under the ctl mutex. */
static void abuse_remove(struct abuse_device *dev)
{
	unsigned int pending;
	LIST_HEAD(done);

	lockdep_assert_held(&abuse_ctl_mutex);
	spin_lock_irq(&dev->lock);
	pending = dev->stats.queued + dev->stats.in_flight;
	abuse_fail_requests(dev, &done, false);
	spin_unlock_irq(&dev->lock);
	if (pending)
		dev_warn_ratelimited(disk_to_dev(dev->disk),
				     "destroyed with %u requests pending: failed with EIO\n",
				     pending);
	abuse_end_list(&done);
	hrtimer_cancel(&dev->wake_timer);
	wake_up_all(&dev->get_wait);
	wake_up_all(&dev->poll_wait);

	blk_mark_disk_dead(dev->disk);
	/* Waits for requests still being copied; new ones fail at once. */
	del_gendisk(dev->disk);
	idr_remove(&abuse_index_idr, dev->config.index);
	put_disk(dev->disk);
	module_put(THIS_MODULE);
}

static int abuse_ctl_destroy(const struct abuse_target *target)
{
	struct abuse_device *dev;
	int ret = 0;

	if (target->flags & ~ABUSE_DESTROY_FORCE ||
	    !abuse_reserved_zero(target->__reserved,
				 ARRAY_SIZE(target->__reserved)))
		return -EINVAL;

	mutex_lock(&abuse_ctl_mutex);
	dev = abuse_find(target->index);
	if (!dev) {
		ret = -ENODEV;
		goto out_unlock;
	}
	/* Under open_mutex no one can open it between check and mark. */
	mutex_lock(&dev->disk->open_mutex);
	if (disk_openers(dev->disk) &&
	    !(target->flags & ABUSE_DESTROY_FORCE)) {
		mutex_unlock(&dev->disk->open_mutex);
		ret = -EBUSY;
		goto out_unlock;
	}
	spin_lock_irq(&dev->lock);
	WRITE_ONCE(dev->dead, true);
	spin_unlock_irq(&dev->lock);
	/*
	 * Pairs with queue_rq's llist_add(), then its read of dead: either
	 * abuse_remove() takes that request from dev->submitted, or queue_rq
	 * sees dead and fails it.
	 */
	smp_mb();
	mutex_unlock(&dev->disk->open_mutex);

	abuse_remove(dev);
out_unlock:
	mutex_unlock(&abuse_ctl_mutex);
	return ret;
}

static int abuse_ctl_info(struct abuse_info *info)
{
	struct abuse_device *dev;

	mutex_lock(&abuse_ctl_mutex);
	dev = abuse_find(info->config.index);
	if (dev) {
		spin_lock_irq(&dev->lock);
		abuse_take_submitted(dev);	/* for a true queued count */
		info->config = dev->config;
		info->counters = dev->stats;
		spin_unlock_irq(&dev->lock);
	}
	mutex_unlock(&abuse_ctl_mutex);
	return dev ? 0 : -ENODEV;
}

/* Online change: size (resize) and ABUSE_F_READ_ONLY; nothing else. */
static int abuse_ctl_set_info(const struct abuse_config *cfg)
{
	const u64 mutable = ABUSE_F_READ_ONLY;
	struct abuse_device *dev;
	struct abuse_config cur;
	int ret = 0;

	if (!abuse_reserved_zero(cfg->__reserved, ARRAY_SIZE(cfg->__reserved)))
		return -EINVAL;

	mutex_lock(&abuse_ctl_mutex);
	dev = abuse_find(cfg->index);
	if (!dev) {
		ret = -ENODEV;
		goto out_unlock;
	}
	cur = dev->config;
	if (cfg->block_size != cur.block_size ||
	    (cfg->flags & ~mutable) != (cur.flags & ~mutable) ||
	    cfg->queue_depth != cur.queue_depth ||
	    cfg->max_request_bytes != cur.max_request_bytes ||
	    cfg->timeout_ms != cur.timeout_ms ||
	    cfg->retries != cur.retries ||
	    !cfg->size || cfg->size % cur.block_size ||
	    (cfg->size >> SECTOR_SHIFT) > (u64)LLONG_MAX >> SECTOR_SHIFT) {
		ret = -EINVAL;
		goto out_unlock;
	}

	spin_lock_irq(&dev->lock);
	dev->config.size = cfg->size;
	dev->config.flags = cfg->flags;
	spin_unlock_irq(&dev->lock);
	set_disk_ro(dev->disk, cfg->flags & ABUSE_F_READ_ONLY);
	/* Sends a RESIZE uevent; the new size is seen while open. */
	set_capacity_and_notify(dev->disk, cfg->size >> SECTOR_SHIFT);
out_unlock:
	mutex_unlock(&abuse_ctl_mutex);
	return ret;
}

static int abuse_ctl_attach(struct file *file,
			    const struct abuse_target *target)
{
	struct abuse_device *dev;
	struct abuse_worker *w;
	int ret = 0;

	if (target->flags ||
	    !abuse_reserved_zero(target->__reserved,
				 ARRAY_SIZE(target->__reserved)))
		return -EINVAL;

	w = kzalloc(sizeof(*w), GFP_KERNEL);
	if (!w)
		return -ENOMEM;
	INIT_LIST_HEAD(&w->node);
	w->owner = get_pid(task_tgid(current));

	mutex_lock(&abuse_ctl_mutex);
	dev = abuse_find(target->index);
	if (!dev) {
		ret = -ENODEV;
		goto out_unlock;
	}
	w->dev = dev;
	/* A file serves one disk for its whole life. */
	if (cmpxchg(&file->private_data, NULL, w)) {
		ret = -EBUSY;
		goto out_unlock;
	}
	kref_get(&dev->kref);
	w->id = ++abuse_last_worker_id;
	spin_lock_irq(&dev->lock);
	list_add_tail(&w->node, &dev->workers);
	dev->stats.attached++;
	spin_unlock_irq(&dev->lock);
	w = NULL;
out_unlock:
	mutex_unlock(&abuse_ctl_mutex);
	if (w) {
		put_pid(w->owner);
		kfree(w);
	}
	return ret;
}

static int abuse_ctl_reset(const struct abuse_target *target)
{
	struct abuse_device *dev;
	LIST_HEAD(done);
	unsigned int requeued = 0;

	if (target->flags & ~ABUSE_RESET_FAIL ||
	    !abuse_reserved_zero(target->__reserved,
				 ARRAY_SIZE(target->__reserved)))
		return -EINVAL;

	mutex_lock(&abuse_ctl_mutex);
	dev = abuse_find(target->index);
	if (!dev) {
		mutex_unlock(&abuse_ctl_mutex);
		return -ENODEV;
	}
	spin_lock_irq(&dev->lock);
	if (target->flags & ABUSE_RESET_FAIL)
		abuse_fail_requests(dev, &done,
				    dev->config.flags & ABUSE_F_FENCE);
	else
		requeued = abuse_reclaim_in_flight(dev);
	spin_unlock_irq(&dev->lock);
	abuse_end_list(&done);
	abuse_kill_fenced(dev);
	if (requeued)
		abuse_wake(dev, requeued, ABUSE_DS_WAKE_PASSED);
	mutex_unlock(&abuse_ctl_mutex);
	return 0;
}

static int abuse_ctl_version(struct abuse_version *version)
{
	memset(version, 0, sizeof(*version));
	version->version = ABUSE_VERSION;
	version->max_batch = ABUSE_MAX_BATCH;
	version->features = ABUSE_F_ALL;
	version->xfer_features = ABUSE_XFER_ALL;
	return 0;
}

/* The worker this file is, once attached, or NULL. */
static struct abuse_worker *abuse_file_worker(struct file *file)
{
	return READ_ONCE(file->private_data);
}

static int abuse_ctl_xfer(struct file *file, struct abuse_xfer *x, bool put)
{
	struct abuse_worker *w = abuse_file_worker(file);
	struct abuse_device *dev;
	int ret;

	if (!w)
		return -EBADFD;
	dev = w->dev;
	if (x->flags & ~ABUSE_XFER_ALL ||
	    (x->flags & ABUSE_XFER_NOWAIT && x->flags & ABUSE_XFER_TIMEOUT) ||
	    (!(x->flags & ABUSE_XFER_TIMEOUT) && x->timeout_ms) ||
	    (!(x->flags & ABUSE_XFER_TOKENS) && x->tokens) ||
	    !abuse_reserved_zero(x->__reserved, ARRAY_SIZE(x->__reserved)) ||
	    (!put && x->nr_replies))
		return -EINVAL;
	/*
	 * Payload addresses are buffer + offset: a buffer whose end does
	 * not fit in 64 bits would wrap them around to memory the caller
	 * never named.
	 */
	if (x->max_requests && x->buffer_size > U64_MAX - x->buffer)
		return -EINVAL;
	/*
	 * Mapped, every offset of the disk must fall inside the buffer.
	 * The size is read without the lock: a resize racing with this
	 * check is caught again per request in abuse_get_chunk().
	 */
	if (x->max_requests && x->flags & ABUSE_XFER_MAPPED &&
	    x->buffer_size < READ_ONCE(dev->config.size))
		return -EINVAL;
	if (x->nr_replies > ABUSE_MAX_BATCH ||
	    x->max_requests > ABUSE_MAX_BATCH)
		return -E2BIG;
	if (READ_ONCE(dev->dead))
		return -ENODEV;

	x->nr_requests = 0;
	x->nr_accepted = 0;
	if (put) {
		ret = abuse_put(dev, w, x);
		if (ret)
			return ret;
	}
	ret = abuse_get(dev, w, x);
	/*
	 * The answers are in: a PUT that answered any reports them even if
	 * its GET failed, and must not be restarted (they would be sent
	 * twice).  One that answered none is restarted like a GET.
	 */
	if (put && (ret == -ENOBUFS || (ret == -ERESTARTSYS && x->nr_replies)))
		return 0;
	return ret;
}

/*
 * Opening /dev/abuse needs CAP_SYS_ADMIN, and so, at every call, does
 * each command that makes, removes or changes a disk or binds a file to
 * one.  A file attached by a privileged supervisor may thus be handed to
 * an unprivileged worker: it can GET, PUT, poll and read INFO, no more.
 */
static bool abuse_ioc_needs_admin(unsigned int cmd)
{
	switch (cmd) {
	case ABUSE_IOC_CREATE:
	case ABUSE_IOC_DESTROY:
	case ABUSE_IOC_SET_INFO:
	case ABUSE_IOC_ATTACH:
	case ABUSE_IOC_RESET:
		return true;
	default:
		return false;
	}
}

static long abuse_ctl_ioctl(struct file *file, unsigned int cmd,
			    unsigned long arg)
{
	void __user *argp = (void __user *)arg;
	union {
		struct abuse_version version;
		struct abuse_config config;
		struct abuse_info info;
		struct abuse_target target;
		struct abuse_xfer xfer;
	} u;
	int ret;

	if (abuse_ioc_needs_admin(cmd) && !capable(CAP_SYS_ADMIN))
		return -EPERM;

	switch (cmd) {
	case ABUSE_IOC_VERSION:
		ret = abuse_ctl_version(&u.version);
		if (copy_to_user(argp, &u.version, sizeof(u.version)))
			return -EFAULT;
		return ret;
	case ABUSE_IOC_CREATE:
		if (copy_from_user(&u.config, argp, sizeof(u.config)))
			return -EFAULT;
		ret = abuse_ctl_create(&u.config);
		if (ret)
			return ret;
		if (copy_to_user(argp, &u.config, sizeof(u.config))) {
			/* Nothing half-done: the caller never learnt N. */
			struct abuse_target undo = {
				.index = u.config.index,
				.flags = ABUSE_DESTROY_FORCE,
			};

			abuse_ctl_destroy(&undo);
			return -EFAULT;
		}
		return 0;
	case ABUSE_IOC_DESTROY:
		if (copy_from_user(&u.target, argp, sizeof(u.target)))
			return -EFAULT;
		return abuse_ctl_destroy(&u.target);
	case ABUSE_IOC_INFO:
		if (copy_from_user(&u.info, argp, sizeof(u.info)))
			return -EFAULT;
		ret = abuse_ctl_info(&u.info);
		if (!ret && copy_to_user(argp, &u.info, sizeof(u.info)))
			return -EFAULT;
		return ret;
	case ABUSE_IOC_SET_INFO:
		if (copy_from_user(&u.config, argp, sizeof(u.config)))
			return -EFAULT;
		return abuse_ctl_set_info(&u.config);
	case ABUSE_IOC_ATTACH:
		if (copy_from_user(&u.target, argp, sizeof(u.target)))
			return -EFAULT;
		return abuse_ctl_attach(file, &u.target);
	case ABUSE_IOC_GET:
	case ABUSE_IOC_PUT:
		if (copy_from_user(&u.xfer, argp, sizeof(u.xfer)))
			return -EFAULT;
		/*
		 * The answer goes back here: find out now that it can, not
		 * after the PUT half answered and the GET half took requests
		 * that the caller would then never learn it holds.
		 */
		if (copy_to_user(argp, &u.xfer, sizeof(u.xfer)))
			return -EFAULT;
		ret = abuse_ctl_xfer(file, &u.xfer, cmd == ABUSE_IOC_PUT);
		if (ret)
			return ret;
		if (copy_to_user(argp, &u.xfer, sizeof(u.xfer)))
			return -EFAULT;
		return 0;
	case ABUSE_IOC_RESET:
		if (copy_from_user(&u.target, argp, sizeof(u.target)))
			return -EFAULT;
		return abuse_ctl_reset(&u.target);
	default:
		return -ENOTTY;
	}
}

static __poll_t abuse_ctl_poll(struct file *file, poll_table *wait)
{
	struct abuse_worker *w = abuse_file_worker(file);
	struct abuse_device *dev;

	if (!w)
		return EPOLLERR;
	dev = w->dev;
	poll_wait(file, &dev->poll_wait, wait);
	/*
	 * Pairs with wq_has_sleeper() in queue_rq and abuse_wake(): either
	 * they see us on poll_wait, or we see their queued count.
	 */
	smp_mb();
	if (READ_ONCE(dev->dead))
		return EPOLLHUP;
	return abuse_has_work(dev) ? EPOLLIN | EPOLLRDNORM : 0;
}

static int abuse_ctl_open(struct inode *inode, struct file *file)
{
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	/* misc_open left the miscdevice here; we keep the attached disk. */
	file->private_data = NULL;
	return nonseekable_open(inode, file);
}

/*
 * A closing worker's requests go back to the queue for the next one.
 * For a fenced worker this is the moment the fence waited for: the
 * file's last user is gone, so nothing it was given can be stored.
 */
static int abuse_ctl_release(struct inode *inode, struct file *file)
{
	struct abuse_worker *w = abuse_file_worker(file);
	struct abuse_device *dev;
	unsigned int requeued;
	struct pid *kill;

	if (!w)
		return 0;
	dev = w->dev;
	abuse_set_serving(dev, w, false);
	spin_lock_irq(&dev->lock);
	requeued = abuse_requeue_in_flight(dev, w);
	list_del(&w->node);
	if (dev->lead == w) {
		dev->lead = NULL;
		WRITE_ONCE(dev->lead_blocks, false);
	}
	kill = w->kill;
	dev->stats.attached--;
	spin_unlock_irq(&dev->lock);
	if (requeued)
		abuse_wake(dev, requeued, ABUSE_DS_WAKE_PASSED);
	put_pid(kill);
	put_pid(w->owner);
	kfree(w);
	kref_put(&dev->kref, abuse_dev_release);
	return 0;
}

/*
 * /proc/PID/fdinfo/FD of an attached file: the disk it serves, its id (as
 * debugfs names holders) and how many requests it holds now.  The file
 * is pinned while this runs, so its worker and disk are too.
 */
static void abuse_ctl_show_fdinfo(struct seq_file *m, struct file *file)
{
	struct abuse_worker *w = abuse_file_worker(file);
	struct abuse_device *dev;
	unsigned int tag, held = 0;
	bool fenced;

	if (!w)
		return;
	dev = w->dev;
	spin_lock_irq(&dev->lock);
	for (tag = 0; tag < dev->config.queue_depth; tag++)
		if (dev->rqs[tag] && abuse_cmd(dev->rqs[tag])->holder == w)
			held++;
	fenced = w->fenced;
	spin_unlock_irq(&dev->lock);
	seq_printf(m, "abuse-disk:\t%u\nabuse-worker:\t%llu\nabuse-held:\t%u\nabuse-fenced:\t%d\n",
		   dev->config.index, w->id, held, fenced);
}

static const struct file_operations abuse_ctl_fops = {
	.owner		= THIS_MODULE,
	.show_fdinfo	= abuse_ctl_show_fdinfo,
	.open		= abuse_ctl_open,
	.release	= abuse_ctl_release,
	.unlocked_ioctl	= abuse_ctl_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.poll		= abuse_ctl_poll,
	.llseek		= noop_llseek,
};

static struct miscdevice abuse_misc = {
	.minor		= MISC_DYNAMIC_MINOR,
	.name		= "abuse",
	.fops		= &abuse_ctl_fops,
	.mode		= 0600,
};

static int __init abuse_init(void)
{
	BUILD_BUG_ON(sizeof(struct abuse_config) != 72);
	BUILD_BUG_ON(sizeof(struct abuse_counters) != 96);
	BUILD_BUG_ON(sizeof(struct abuse_info) != 168);
	BUILD_BUG_ON(sizeof(struct abuse_target) != 24);
	BUILD_BUG_ON(sizeof(struct abuse_version) != 32);
	BUILD_BUG_ON(sizeof(struct abuse_request) != 32);
	BUILD_BUG_ON(sizeof(struct abuse_reply) != 32);
	BUILD_BUG_ON(sizeof(struct abuse_xfer) != 72);

	return misc_register(&abuse_misc);
}

/* Disks pin the module, so none exist here. */
static void __exit abuse_exit(void)
{
	misc_deregister(&abuse_misc);
	idr_destroy(&abuse_index_idr);
}

module_init(abuse_init);
module_exit(abuse_exit);

MODULE_AUTHOR("abuse developers");
MODULE_DESCRIPTION("Block device served from user space");
MODULE_LICENSE("GPL");
