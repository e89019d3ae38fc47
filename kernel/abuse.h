/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * abuse: A Block device in User SpacE -- the user/kernel contract.
 *
 * The module keeps a connectionless queue of block requests per disk
 * behind the control device /dev/abuse.  Any number of worker files
 * ATTACH to a disk, GET batches of requests, and PUT their answers.
 * There is no session: a worker that dies has its requests requeued.
 *
 * This header is the single source of truth for the layouts: the
 * Python package parses it with cffi.  Keep it to fixed-width types,
 * plain #defines and structs, with every size a multiple of 8.
 */
#ifndef _UAPI_LINUX_ABUSE_H
#define _UAPI_LINUX_ABUSE_H

#include <linux/types.h>
#include <linux/ioctl.h>

/*
 * Bumped when a command, flag or field is added; existing ones never
 * change.  2: ABUSE_F_FENCE, ABUSE_F_INDEX, ABUSE_XFER_TOKENS,
 * abuse_version.xfer_features, abuse_counters.fenced.  What a module accepts is told by the feature
 * bits of ABUSE_IOC_VERSION, not by this number: test the bits.
 */
#define ABUSE_VERSION			2

/*
 * Disk features, passed in abuse_config.flags at CREATE and reported by
 * ABUSE_IOC_VERSION in abuse_version.features.  Unknown bits: -EINVAL.
 */
/* The disk rejects writes (may be toggled by SET_INFO). */
#define ABUSE_F_READ_ONLY		(1ULL << 0)
/* Volatile write cache: the worker receives FLUSH and FUA. */
#define ABUSE_F_FLUSH			(1ULL << 1)
/* The worker receives DISCARD requests. */
#define ABUSE_F_DISCARD			(1ULL << 2)
/* The worker receives WRITE_ZEROES requests. */
#define ABUSE_F_WRITE_ZEROES		(1ULL << 3)
/* Report a rotational disk to the block layer. */
#define ABUSE_F_ROTATIONAL		(1ULL << 4)
/*
 * Fence stale workers: a request that times out, or is RESET, while the
 * worker holding it is still alive is not handed to another worker.
 * The holder (the process that last GOT on the file) gets SIGKILL and
 * the request is requeued when its file is released, so a worker that
 * was only stopped or slow can never store a write after another
 * worker took it over.  A holder that cannot die (stuck in the D state)
 * keeps its requests until it does.
 */
#define ABUSE_F_FENCE			(1ULL << 5)
/*
 * CREATE only: make /dev/abuseN with N = abuse_config.index (at most
 * ABUSE_MAX_INDEX; -EEXIST if taken) instead of the lowest free N.  Not
 * a property of the disk: INFO never reports it, SET_INFO refuses it.
 */
#define ABUSE_F_INDEX			(1ULL << 6)
#define ABUSE_F_ALL			0x7fULL

/* Limits. */
#define ABUSE_MAX_INDEX			1048575
#define ABUSE_MIN_BLOCK_SIZE		512
#define ABUSE_MAX_BLOCK_SIZE		4096
#define ABUSE_DEFAULT_QUEUE_DEPTH	128
#define ABUSE_MAX_QUEUE_DEPTH		1024
#define ABUSE_DEFAULT_REQUEST_BYTES	1048576
#define ABUSE_MAX_REQUEST_BYTES		8388608
/* Most descriptors or replies in one GET or PUT; more is -E2BIG. */
#define ABUSE_MAX_BATCH			1024
/* GET places each request's data at a multiple of this in the buffer. */
#define ABUSE_DATA_ALIGN		4096

/*
 * struct abuse_config - what a disk is.  In for CREATE (index out) and
 * SET_INFO (index in; only size and ABUSE_F_READ_ONLY may change);
 * out for INFO.
 */
struct abuse_config {
	__u32 index;			/* N of /dev/abuseN */
	__u32 block_size;		/* bytes: 512, 1024, 2048 or 4096 */
	__u64 size;			/* bytes, a multiple of block_size */
	__u64 flags;			/* ABUSE_F_* */
	__u32 queue_depth;		/* requests; 0 = default */
	__u32 max_request_bytes;	/* bytes per request; 0 = default */
	__u32 timeout_ms;		/* per request; 0 = wait forever */
	__u32 retries;			/* requeues after a timeout, then -EIO */
	__u64 __reserved[4];		/* must be 0 */
};

/*
 * struct abuse_counters - live state of a disk.  Counts are totals since
 * CREATE; queued, in_flight and attached are current values.
 */
struct abuse_counters {
	__u64 queued;			/* waiting for a GET */
	__u64 in_flight;		/* handed to a worker, not yet answered */
	__u64 completed;		/* requests ended, with any status */
	__u64 errors;			/* of those, ended with an error */
	__u64 requeued;			/* returned to the queue: close, RESET, timeout */
	__u64 timeouts;			/* request timeouts seen */
	__u64 rejected;			/* PUT entries refused (stale, bad length, ...) */
	__u64 attached;			/* files attached to the disk */
	__u64 bytes_read;		/* bytes of reads completed without error */
	__u64 bytes_written;		/* bytes of writes completed without error */
	__u64 fenced;			/* holders killed by ABUSE_F_FENCE */
	__u64 __reserved[1];		/* 0 */
};

/* struct abuse_info - INFO: config.index in, everything else out. */
struct abuse_info {
	struct abuse_config config;
	struct abuse_counters counters;
};

/* abuse_target.flags for DESTROY: fail queued and in-flight I/O even if open. */
#define ABUSE_DESTROY_FORCE		(1U << 0)
/* abuse_target.flags for RESET: fail every request with -EIO, do not requeue. */
#define ABUSE_RESET_FAIL		(1U << 0)

/* struct abuse_target - names one disk for DESTROY, ATTACH and RESET. */
struct abuse_target {
	__u32 index;			/* in: N of /dev/abuseN */
	__u32 flags;			/* in: ABUSE_DESTROY_* or ABUSE_RESET_* */
	__u64 __reserved[2];		/* must be 0 */
};

/* struct abuse_version - VERSION: what this module speaks. */
struct abuse_version {
	__u32 version;			/* out: ABUSE_VERSION */
	__u32 max_batch;		/* out: ABUSE_MAX_BATCH */
	__u64 features;			/* out: ABUSE_F_* this module supports */
	__u64 xfer_features;		/* out: ABUSE_XFER_* it accepts (0 in v1) */
	__u64 __reserved[1];		/* out: 0 */
};

/* abuse_request.op */
#define ABUSE_OP_READ			0
#define ABUSE_OP_WRITE			1
#define ABUSE_OP_FLUSH			2
#define ABUSE_OP_DISCARD		3
#define ABUSE_OP_WRITE_ZEROES		4

/* abuse_request.flags */
#define ABUSE_REQ_FUA			(1U << 0)

/*
 * struct abuse_request - one descriptor filled by GET.
 *
 * The handle is opaque to the worker: it names the request and the
 * generation in which it was handed out.  Once the request is requeued
 * (close, RESET, timeout) or completed, the handle is stale.
 */
struct abuse_request {
	__u64 handle;			/* out: echo in abuse_reply.handle */
	__u64 offset;			/* out: bytes from the start of the disk */
	__u64 data;			/* out: user address inside the GET buffer */
	__u32 length;			/* out: bytes */
	__u16 op;			/* out: ABUSE_OP_* */
	__u16 flags;			/* out: ABUSE_REQ_* */
};

/*
 * struct abuse_reply - one answer given to PUT.
 *
 * Each entry is checked on its own and gets its own status:
 *   0		accepted, the request is completed with @result
 *   -ESTALE	unknown handle, the request was requeued or completed
 *		since it was handed out, or it was handed to another file
 *		(only the file that took a request answers it); nothing
 *		was done
 *   -EINVAL	@length differs from the request's, @result is not 0 or a
 *		negative errno, or a reserved field is not 0
 *   -EFAULT	@data could not be read (reads only); the request stays
 *		in flight and the same handle may be PUT again
 */
struct abuse_reply {
	__u64 handle;			/* in: from abuse_request.handle */
	__u64 data;			/* in: user address of read data, else 0 */
	__u32 length;			/* in: bytes, the request's length */
	__s32 result;			/* in: 0 or -errno for the application */
	__s32 status;			/* out: see above */
	__u32 __reserved;		/* must be 0 */
};

/* abuse_xfer.flags */
#define ABUSE_XFER_NOWAIT		(1U << 0)	/* GET never blocks */
#define ABUSE_XFER_TIMEOUT		(1U << 1)	/* GET waits @timeout_ms at most */
#define ABUSE_XFER_MAPPED		(1U << 2)	/* @buffer maps the disk */
#define ABUSE_XFER_TOKENS		(1U << 3)	/* fill @tokens */
#define ABUSE_XFER_ALL			0xfU

/*
 * struct abuse_xfer - argument of GET and PUT on an attached file.
 *
 * PUT answers @nr_replies entries of @replies, then, if @max_requests
 * is not 0, does a GET in the same call.  GET (and the GET half of PUT)
 * moves up to @max_requests queued requests to in flight, copies each
 * write's payload into @buffer and fills @requests.  With nothing
 * queued it blocks until a request arrives, unless ABUSE_XFER_NOWAIT,
 * in which case it returns 0 with @nr_requests 0, or ABUSE_XFER_TIMEOUT,
 * in which case it returns so after @timeout_ms without a request.  One
 * blocked GET is woken per queued request, the one that blocked last
 * first (so one busy worker keeps its requests and the others sleep).
 * A GET that may block also leaves queued requests to a busy worker
 * that keeps up with them, and waits on; with ABUSE_XFER_TIMEOUT it
 * then returns after @timeout_ms with @nr_requests 0 even though
 * requests are queued (a worker just calls again).
 * A signal ends a blocked GET with -ERESTARTSYS: it is restarted for a
 * handler with SA_RESTART, else fails with -EINTR; a PUT that answered
 * replies before its GET half was interrupted returns 0 instead, with
 * @nr_requests 0.  A request larger than @buffer_size is never handed
 * out: -ENOBUFS.  A
 * buffer whose end, @buffer + @buffer_size, does not fit in 64 bits is
 * refused: -EINVAL.  A struct abuse_xfer that cannot be both read and
 * written is -EFAULT before anything else, with nothing answered or
 * taken; so is a PUT whose @replies cannot all be read, or their
 * statuses written.
 *
 * With ABUSE_XFER_MAPPED, @buffer is the whole disk, mapped (a memory
 * backend's mapping, say): a request at byte offset O has its data at
 * @buffer + O.  A write's payload is copied there at GET, so it is
 * stored by the time the worker sees it; a read is answered from the
 * same address.  One copy each way, none in the worker.  A GET needs
 * @buffer_size at least the disk's size, else -EINVAL (after a resize,
 * say: serve by copy then).
 *
 * With ABUSE_XFER_TOKENS, @tokens is the user address of a __u64 array
 * of @max_requests entries, and GET stores in entry i the fencing token
 * of descriptor i: a disk-wide number that grows at every hand-out, so
 * a request handed out later (a requeued one included) always has a
 * larger token.  A backend over a store with conditional writes keeps,
 * per block, the largest token stored, and drops a write with a smaller
 * one: that write is stale (its request was handed to another worker)
 * or superseded by a later one.  Without the flag @tokens must be 0.
 */
struct abuse_xfer {
	__u64 replies;			/* in: user address of abuse_reply[] */
	__u64 requests;			/* in: user address of abuse_request[] */
	__u64 buffer;			/* in: user address of the data buffer */
	__u64 buffer_size;		/* in: bytes */
	__u32 nr_replies;		/* in: entries in @replies (PUT only) */
	__u32 max_requests;		/* in: room in @requests */
	__u32 nr_requests;		/* out: descriptors filled */
	__u32 nr_accepted;		/* out: replies with status 0 */
	__u32 flags;			/* in: ABUSE_XFER_* */
	__u32 timeout_ms;		/* in: with ABUSE_XFER_TIMEOUT, else 0 */
	__u64 tokens;			/* in: with ABUSE_XFER_TOKENS, else 0 */
	__u64 __reserved[1];		/* must be 0 */
};

/*
 * Commands on /dev/abuse.  ATTACH binds the file to one disk; GET, PUT
 * and poll (POLLIN while the disk has queued requests, POLLHUP once it
 * is destroyed) then act on that disk.
 *
 * Opening needs CAP_SYS_ADMIN; so do CREATE, DESTROY, SET_INFO, ATTACH
 * and RESET at every call (-EPERM).  An attached file handed to a process
 * without it can still GET, PUT, poll, INFO and VERSION.  A file whose
 * holder was fenced (ABUSE_F_FENCE) answers GET with -ESHUTDOWN.
 *
 * sysfs, readable by anyone: /sys/block/abuseN/abuse/ holds one file per
 * counter of struct abuse_counters and per field of struct abuse_config
 * (flags in hex), and "workers": the pids serving the disk, one per
 * attached file (the process that last did a GET, else the one that
 * attached), space-separated.
 *
 * For debugging, not an interface to build on: an attached file's
 * /proc/PID/fdinfo/FD has "abuse-disk", "abuse-worker" (an id per
 * attached file), "abuse-held" (requests it holds now) and
 * "abuse-fenced" lines, and each request line of blk-mq's debugfs
 * (/sys/kernel/debug/block/abuseN/hctx0/busy) ends with the driver's
 * .abuse_state (queued, held, busy: being copied), .abuse_handle and,
 * while held, .abuse_holder (that worker id), .abuse_holder_pid and
 * .abuse_held_ms.
 */
#define ABUSE_IOC_MAGIC			0xE4

#define ABUSE_IOC_VERSION	_IOR(ABUSE_IOC_MAGIC, 0x00, struct abuse_version)
#define ABUSE_IOC_CREATE	_IOWR(ABUSE_IOC_MAGIC, 0x01, struct abuse_config)
#define ABUSE_IOC_DESTROY	_IOW(ABUSE_IOC_MAGIC, 0x02, struct abuse_target)
#define ABUSE_IOC_INFO		_IOWR(ABUSE_IOC_MAGIC, 0x03, struct abuse_info)
#define ABUSE_IOC_SET_INFO	_IOW(ABUSE_IOC_MAGIC, 0x04, struct abuse_config)
#define ABUSE_IOC_ATTACH	_IOW(ABUSE_IOC_MAGIC, 0x05, struct abuse_target)
#define ABUSE_IOC_GET		_IOWR(ABUSE_IOC_MAGIC, 0x06, struct abuse_xfer)
#define ABUSE_IOC_PUT		_IOWR(ABUSE_IOC_MAGIC, 0x07, struct abuse_xfer)
#define ABUSE_IOC_RESET		_IOW(ABUSE_IOC_MAGIC, 0x08, struct abuse_target)

#endif /* _UAPI_LINUX_ABUSE_H */
