/* A seed planted by another extension's GIL-free call: what _cspawn.c exports to
 * _cplace.c (a capsule), so that a place and its seed are made in one call that lets
 * the GIL go (see _cplace.c's make_place and ARCHITECTURE.md, "What a place costs
 * the server"). The seed itself is _cspawn.c's (its child code, its memory blocks).
 */
#ifndef TW_CSEED_H
#define TW_CSEED_H

#include <Python.h>

#define TW_SEED_API_CAPSULE "trio_worker._host._cspawn._seed_api"
#define TW_SEED_API_VERSION 1

struct tw_seed_plant {
    /* In. */
    const int *cgroup_fds; /* what the seed joins its groups by (the caller keeps them) */
    int n_cgroup_fds;
    long nofile_soft; /* the job's soft RLIMIT_NOFILE, -1: the server's */
    const int *pipe_sizes; /* F_SETPIPE_SZ sizes to try on stdout's and stderr's pipes */
    int n_pipe_sizes;
    void *block; /* take_block's */
    /* Out: err 0 and every field below, or err, what (the step) and nothing left open,
     * no child. */
    int err;
    const char *what;
    int pid, go_fd, report_fd, pidfd;
    int out_r, err_r; /* the read ends of the seed's stdout and stderr */
    long long start_time; /* /proc/PID/stat's field 22 (clock ticks after boot), -1: unknown */
};

struct tw_seed_api {
    int version;
    /* GIL held: the seed's memory (NULL: errno says why). */
    void *(*take_block)(void);
    /* GIL released: the output pipes, /dev/null, the clone (returns once the seed holds
     * nothing of the server's but what it needs), its pidfd and start time. */
    void (*plant)(struct tw_seed_plant *);
    /* GIL held: the _cspawn.Seed of a planted seed, owning its block, go and report fds
     * (NULL: an exception set, the seed killed and reaped, every fd of it closed). */
    PyObject *(*adopt)(struct tw_seed_plant *);
    /* GIL held: the block of a plant that failed (or never ran). */
    void (*give_back)(void *block);
};

#endif
