/* vfork + exec with what a job needs between the two, for trio_worker._host._spawn.
 *
 * Why C: Python's subprocess forks the whole server (3-9 ms, growing with its
 * RSS, on the event loop) as soon as it needs a preexec_fn, and we need one to
 * join the job's cgroups before the command's first instruction. vfork shares
 * the parent's memory instead of copying it: the parent thread is suspended
 * only until the child has exec'd (tens to a few hundred microseconds).
 *
 * The child runs on the parent's stack, so it only calls async-signal-safe
 * system calls on data prepared before vfork, and reports a failure through
 * memory the parent reads after the child is gone (then exits 127).
 *
 * A cgroup v2 group passed as a directory fd is joined by the clone itself
 * (clone3 with CLONE_INTO_CGROUP, x86-64, Linux 5.7+): the child is born in it.
 * Writing a pid to cgroup.procs takes the kernel's cgroup_threadgroup_rwsem for
 * writing, which waits for an RCU grace period unless another write happened a
 * moment before (measured: 7.8 ms cold, 0.015 ms warm); the clone takes it for
 * reading only. Where clone3 cannot do it, the child writes to the group's
 * cgroup.procs as for v1 hierarchies (opened here, before the clone).
 *
 * Order in the child, each step for a reason:
 *   1. write "0" to each inherited cgroup.procs fd: before anything of the
 *      command runs, and while we still have the server's credentials;
 *   1b. the soft RLIMIT_NOFILE the server started with (it raised its own);
 *   2. new session (+ controlling terminal) or a new process group;
 *   3. stdin/stdout/stderr;
 *   4. setgroups, setgid, setuid (in that order: each needs the privilege the
 *      next one drops);
 *   5. chdir, as the job's user;
 *   6. PR_SET_PDEATHSIG *after* the credential change, which clears it; then
 *      make sure the parent did not die before it took hold;
 *   7. default signal dispositions, empty signal mask, mark other fds CLOEXEC;
 *   8. execve along the prepared candidate paths (execvp's rules, no ENOEXEC
 *      fallback, as subprocess).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h> /* CLONE_VM, CLONE_VFORK */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <structmember.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "_cseed.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

enum stage {
    STAGE_OK = 0,
    STAGE_CGROUP = 1,
    STAGE_SESSION = 2,
    STAGE_TTY = 3,
    STAGE_FDS = 4,
    STAGE_SETGROUPS = 5,
    STAGE_SETGID = 6,
    STAGE_SETUID = 7,
    STAGE_CHDIR = 8,
    STAGE_PDEATHSIG = 9,
    STAGE_PARENT_GONE = 10,
    STAGE_EXEC = 11,
    STAGE_RLIMIT = 12,
};

struct report {
    int stage;
    int err;
    int index;
};

struct plan {
    char **paths;   /* candidate executables, NULL-terminated */
    char **argv;
    char **envp;
    const char *cwd; /* or NULL */
    int fds[3];
    int *cgroup_fds;
    Py_ssize_t n_cgroup_fds;
    int new_session; /* setsid instead of setpgid */
    int ctty;        /* make fds[0] the controlling terminal (implies new_session) */
    long uid;        /* -1: keep */
    long gid;        /* -1: keep */
    gid_t *groups;   /* NULL: keep */
    Py_ssize_t n_groups;
    int pdeathsig;   /* 0: none */
    pid_t parent;
    long nofile_soft; /* -1: keep */
    int into_index;  /* the cgroup_fds entry that is a v2 directory (clone into it), or -1 */
    int joined_by_clone; /* set once the clone put the child in that group */
};

static void __attribute__((noreturn))
fail(volatile struct report *r, int stage, int index)
{
    r->err = errno;
    r->index = index;
    r->stage = stage;
    _exit(127);
}

static void __attribute__((noreturn))
child(const struct plan *p, volatile struct report *r)
{
    Py_ssize_t i;
    int fds[3];

    for (i = 0; i < p->n_cgroup_fds; i++) {
        if (i == p->into_index && p->joined_by_clone)
            continue;
        if (write(p->cgroup_fds[i], "0", 1) != 1)
            fail(r, STAGE_CGROUP, (int)i);
    }
    if (p->nofile_soft >= 0) {
        struct rlimit lim;
        if (getrlimit(RLIMIT_NOFILE, &lim) < 0)
            fail(r, STAGE_RLIMIT, 0);
        if ((rlim_t)p->nofile_soft < lim.rlim_cur) {
            lim.rlim_cur = (rlim_t)p->nofile_soft;
            if (setrlimit(RLIMIT_NOFILE, &lim) < 0)
                fail(r, STAGE_RLIMIT, 0);
        }
    }
    if (p->new_session || p->ctty) {
        if (setsid() < 0)
            fail(r, STAGE_SESSION, 0);
    } else if (setpgid(0, 0) < 0) {
        fail(r, STAGE_SESSION, 0);
    }
    if (p->ctty && ioctl(p->fds[0], TIOCSCTTY, 0) < 0)
        fail(r, STAGE_TTY, 0);
    /* Move sources out of 0..2 first, so no dup2 overwrites a later source. */
    for (i = 0; i < 3; i++) {
        fds[i] = p->fds[i];
        if (fds[i] < 3) {
            fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
            if (fds[i] < 0)
                fail(r, STAGE_FDS, (int)i);
        }
    }
    for (i = 0; i < 3; i++) {
        if (dup2(fds[i], (int)i) < 0)
            fail(r, STAGE_FDS, (int)i);
    }
    /* Raw system calls, not glibc's wrappers: in a multi-threaded process those
     * broadcast the change to every thread (SIGSETXID) under a lock of the
     * parent's, which a vfork child sharing the parent's memory must not touch. */
    if (p->groups != NULL && syscall(SYS_setgroups, (size_t)p->n_groups, p->groups) < 0)
        fail(r, STAGE_SETGROUPS, 0);
    if (p->gid >= 0 && syscall(SYS_setresgid, (gid_t)p->gid, (gid_t)p->gid, (gid_t)p->gid) < 0)
        fail(r, STAGE_SETGID, 0);
    if (p->uid >= 0 && syscall(SYS_setresuid, (uid_t)p->uid, (uid_t)p->uid, (uid_t)p->uid) < 0)
        fail(r, STAGE_SETUID, 0);
    if (p->cwd != NULL && chdir(p->cwd) < 0)
        fail(r, STAGE_CHDIR, 0);
    if (p->pdeathsig) {
        if (prctl(PR_SET_PDEATHSIG, p->pdeathsig, 0, 0, 0) < 0)
            fail(r, STAGE_PDEATHSIG, 0);
        if (getppid() != p->parent) {
            errno = ESRCH;
            fail(r, STAGE_PARENT_GONE, 0);
        }
    }
    {
        struct sigaction dfl;
        sigset_t none;
        int sig;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (sig = 1; sig < NSIG; sig++) {
            if (sig == SIGKILL || sig == SIGSTOP)
                continue;
            (void)sigaction(sig, &dfl, NULL); /* EINVAL for glibc's own: fine */
        }
        sigemptyset(&none);
        (void)sigprocmask(SIG_SETMASK, &none, NULL);
    }
#ifdef SYS_close_range
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        /* Older kernels: nothing to do, the server opens everything CLOEXEC. */
    }
#endif /* (headers before Linux 5.9 do not name it: the same, at build time) */
    {
        int saved = 0;
        char **path;
        for (path = p->paths; *path != NULL; path++) {
            execve(*path, p->argv, p->envp);
            if (errno == EACCES) {
                saved = EACCES;
            } else if (errno != ENOENT && errno != ENOTDIR) {
                saved = errno;
                break;
            }
        }
        errno = saved ? saved : ENOENT;
        fail(r, STAGE_EXEC, 0);
    }
}

#if defined(__x86_64__)
#define HAVE_CLONE_INTO 1
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

struct clone_args_v2 { /* struct clone_args up to its cgroup field (CLONE_ARGS_SIZE_VER2) */
    unsigned long long flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
        set_tid, set_tid_size, cgroup;
};

struct child_start {
    const struct plan *p;
    volatile struct report *r;
};

/* clone3(args, size) whose child calls fn(arg) on the stack the args give and
 * never returns; returns the child's pid or -errno in the parent. In assembly
 * because the child starts on a new stack, with no frame of ours to return to. */
long tw_clone3_run(struct clone_args_v2 *args, size_t size, void (*fn)(void *), void *arg);
__asm__(".text\n"
        ".p2align 4\n"
        ".type tw_clone3_run, @function\n"
        "tw_clone3_run:\n"
        "    mov %rdx, %r8\n" /* fn and arg survive the syscall in r8/r9 */
        "    mov %rcx, %r9\n"
        "    mov $435, %eax\n" /* __NR_clone3 */
        "    syscall\n"
        "    test %rax, %rax\n"
        "    jnz 1f\n"
        "    xor %ebp, %ebp\n" /* the child: outermost frame */
        "    mov %r9, %rdi\n"
        "    call *%r8\n"
        "    mov $127, %edi\n"
        "    mov $60, %eax\n" /* exit(127), not reached */
        "    syscall\n"
        "    hlt\n"
        "1:  ret\n"
        ".size tw_clone3_run, .-tw_clone3_run\n");

static void
child_entry(void *arg)
{
    struct child_start *start = arg;
    child(start->p, start->r);
}
#endif

/* vfork (or clone3 into the v2 group, with vfork's semantics) in a frame of its
 * own: nothing the caller keeps in registers can be clobbered by the child.
 * Returns the pid, or -1 with errno set. */
static pid_t __attribute__((noinline))
start_child(struct plan *p, volatile struct report *r, char *stack, size_t stack_size)
{
    sigset_t all, old;
    pid_t pid = -1;
    int saved;
    /* No handler of the parent may run in the child, which shares its memory. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
#ifdef HAVE_CLONE_INTO
    if (p->into_index >= 0 && stack != NULL) {
        struct clone_args_v2 args;
        struct child_start start = {p, r};
        long ret;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP;
        args.exit_signal = SIGCHLD;
        args.stack = (unsigned long long)(uintptr_t)stack;
        args.stack_size = stack_size;
        args.cgroup = (unsigned long long)p->cgroup_fds[p->into_index];
        p->joined_by_clone = 1;
        ret = tw_clone3_run(&args, sizeof args, child_entry, &start);
        if (ret > 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            return (pid_t)ret;
        }
        p->joined_by_clone = 0;
        if (ret == -EAGAIN || ret == -ENOMEM) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            errno = (int)-ret;
            return -1;
        }
        /* No clone3, or it cannot put the child there: the child writes instead. */
    }
#endif
    if (p->into_index >= 0) {
        int dir = p->cgroup_fds[p->into_index];
        int procs = openat(dir, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (procs < 0) {
            saved = errno;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            errno = saved;
            return -2; /* reported as the join's failure */
        }
        p->cgroup_fds[p->into_index] = procs;
    }
    pid = vfork();
    if (pid == 0)
        child(p, r);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (p->into_index >= 0 && p->cgroup_fds[p->into_index] >= 0) {
        (void)close(p->cgroup_fds[p->into_index]);
    }
    errno = saved;
    return pid;
}

/* A NULL-terminated copy of a sequence of bytes; NULL with an exception set. */
static char **
bytes_array(PyObject *seq, PyObject **keep)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of bytes");
    Py_ssize_t n, i;
    char **out;
    if (fast == NULL)
        return NULL;
    n = PySequence_Fast_GET_SIZE(fast);
    out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "expected bytes");
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(item);
    }
    *keep = fast; /* the items stay alive while the sequence does */
    return out;
}

static int
int_array(PyObject *seq, Py_ssize_t *n_out, int **out)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of int");
    Py_ssize_t n, i;
    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    *out = PyMem_Calloc((size_t)n + 1, sizeof(int));
    if (*out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(*out);
            *out = NULL;
            Py_DECREF(fast);
            return -1;
        }
        (*out)[i] = (int)v;
    }
    *n_out = n;
    Py_DECREF(fast);
    return 0;
}

PyDoc_STRVAR(spawn_doc,
"spawn(paths, argv, envp, cwd, stdin, stdout, stderr, cgroup_fds, new_session, ctty,\n"
"      uid, gid, groups, pdeathsig, parent, nofile_soft) -> (pid, stage, errno, index)\n\n"
"vfork, prepare the child (see the module comment), exec the first of paths\n"
"that works. On success stage is 0. Otherwise the child is already reaped,\n"
"pid is -1 and stage/errno/index say what failed. OSError if vfork failed.");

/* The clone3 child's stack, until its exec (it runs child() and libc's thin wrappers). */
#define CHILD_STACK (64 * 1024)

static PyObject *
cspawn_spawn(PyObject *self, PyObject *args)
{
    PyObject *paths_o, *argv_o, *envp_o, *cwd_o, *cgroup_o, *groups_o;
    PyObject *keep_paths = NULL, *keep_argv = NULL, *keep_envp = NULL;
    struct plan p;
    volatile struct report r;
    int *groups_int = NULL;
    char *stack = NULL;
    pid_t pid;
    PyObject *result = NULL;
    Py_ssize_t i;

    memset(&p, 0, sizeof p);
    p.into_index = -1;
    if (!PyArg_ParseTuple(args, "OOOOiiiOppllOiil:spawn", &paths_o, &argv_o, &envp_o, &cwd_o,
                          &p.fds[0], &p.fds[1], &p.fds[2], &cgroup_o, &p.new_session, &p.ctty,
                          &p.uid, &p.gid, &groups_o, &p.pdeathsig, &p.parent, &p.nofile_soft))
        return NULL;
    if (cwd_o != Py_None) {
        if (!PyBytes_Check(cwd_o)) {
            PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
            return NULL;
        }
        p.cwd = PyBytes_AS_STRING(cwd_o);
    }
    if ((p.paths = bytes_array(paths_o, &keep_paths)) == NULL)
        goto done;
    if ((p.argv = bytes_array(argv_o, &keep_argv)) == NULL)
        goto done;
    if ((p.envp = bytes_array(envp_o, &keep_envp)) == NULL)
        goto done;
    if (int_array(cgroup_o, &p.n_cgroup_fds, &p.cgroup_fds) < 0)
        goto done;
    if (groups_o != Py_None) {
        if (int_array(groups_o, &p.n_groups, &groups_int) < 0)
            goto done;
        p.groups = PyMem_Calloc((size_t)p.n_groups + 1, sizeof(gid_t));
        if (p.groups == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (i = 0; i < p.n_groups; i++)
            p.groups[i] = (gid_t)groups_int[i];
    }

    /* A directory among the cgroup fds is a v2 group to clone the child into. */
    for (i = 0; i < p.n_cgroup_fds; i++) {
        struct stat st;
        if (fstat(p.cgroup_fds[i], &st) == 0 && S_ISDIR(st.st_mode)) {
            p.into_index = (int)i;
            break;
        }
    }
#ifdef HAVE_CLONE_INTO
    if (p.into_index >= 0) {
        stack = PyMem_Malloc(CHILD_STACK);
        if (stack == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
#endif

    r.stage = STAGE_OK;
    r.err = 0;
    r.index = 0;
    /* The GIL is let go while this thread is suspended (until the child's exec):
     * called from a worker thread, the event loop runs meanwhile. The child reads
     * only the plan, built above from objects the caller keeps alive. */
    {
        int saved = 0;
        Py_BEGIN_ALLOW_THREADS
        pid = start_child(&p, &r, stack, CHILD_STACK);
        saved = errno;
        if (pid == -2) { /* the v2 group's cgroup.procs could not be opened */
            r.stage = STAGE_CGROUP;
            r.err = saved;
            r.index = p.into_index;
        }
        if (pid > 0 && r.stage != STAGE_OK) {
            int status;
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        }
        Py_END_ALLOW_THREADS
        errno = saved;
    }
    if (pid == -1) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (r.stage != STAGE_OK) {
        result = Py_BuildValue("(iiii)", -1, r.stage, r.err, r.index);
    } else {
        result = Py_BuildValue("(iiii)", (int)pid, 0, 0, 0);
    }

done:
    PyMem_Free(p.paths);
    PyMem_Free(p.argv);
    PyMem_Free(p.envp);
    PyMem_Free(p.cgroup_fds);
    PyMem_Free(p.groups);
    PyMem_Free(groups_int);
    PyMem_Free(stack);
    Py_XDECREF(keep_paths);
    Py_XDECREF(keep_argv);
    Py_XDECREF(keep_envp);
    return result;
}

/* ------------------------------------------------------------------------- *
 * Seeds: a job's process made ahead of its Start (see _spawn.Seed).
 *
 * A seed is cloned with CLONE_VM (the server's memory, no page tables copied)
 * but *without* CLONE_VFORK: the cloning thread goes on at once. The child is
 * born in the job's v2 group (CLONE_INTO_CGROUP), writes the v1 hierarchies'
 * cgroup.procs itself, takes its process group, its stdin/stdout/stderr,
 * closes every other descriptor and then blocks in read() on its "go" pipe.
 * At the Start the server writes the command into a block of memory both
 * share (a fresh mapping), then one byte: the child switches user, enters its
 * directory, resets signals and execs. A failure is written to a close-on-exec
 * "report" pipe (its EOF alone means the exec happened). EOF on the go pipe
 * means the server died or gave the seed up: the child exits.
 *
 * The child runs beside the server's threads in the same memory: it makes raw
 * system calls only (no libc: errno and every other thread-local live in the
 * cloning thread's TLS, which may be gone by then), runs on a stack and a
 * thread pointer of its own (CLONE_SETTLS: a zeroed area, so even a stack
 * protector's canary read stays in memory of ours), with every signal blocked
 * from its first instruction (inherited from the clone) until its dispositions
 * are back to default. Its memory (the mapping below) is freed only once the
 * child cannot touch it any more: EOF on the report pipe (exec'd or exited:
 * the kernel drops the mm before the fds) or the child reaped.
 * ------------------------------------------------------------------------- */

#define SEED_MAX_GROUPS 32

struct seed_ctl {
    /* Birth (filled before the clone). */
    int go_r, report_w;
    int fds[3];
    int cgroup_fds[SEED_MAX_GROUPS];
    int n_cgroup_fds;
    int into_index;
    int joined_by_clone;
    long nofile_soft;
    long max_fd; /* close_range's fallback: close() up to here */
    /* Born sharing the server's descriptor table (CLONE_FILES) when > 0: the child
     * takes a copy of only the descriptors below it (its own are there, in the birth's
     * slots) and sets ``unshared`` (1; 2: it could not), waking the parent's futex. */
    unsigned int keep_below;
    int unshared;
    /* The command (filled before the go byte). */
    char **paths;
    char **argv;
    char **envp;
    const char *cwd;
    long uid, gid;
    gid_t *groups;
    long n_groups; /* -1: keep */
    int pdeathsig;
    pid_t parent;
};

#define SEED_NAME "tw-seed" /* a task's comm: at most 15 bytes */
#define SEED_STACK (64 * 1024)
#define SEED_TLS (16 * 1024)
#define SEED_TP_AT (12 * 1024) /* the thread pointer, inside the TLS area */
#define SEED_CTL 4096
/* The command's strings and arrays, when they fit (else a mapping of their own). */
#define SEED_PARAMS (16 * 1024)
#define SEED_BLOCK (SEED_STACK + SEED_TLS + SEED_CTL + SEED_PARAMS)

#if defined(__x86_64__)
#define HAVE_SEED 1
#ifndef CLONE_SETTLS
#define CLONE_SETTLS 0x00080000
#endif

static inline long
raw6(long n, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define RAW1(n, a) raw6((n), (long)(a), 0, 0, 0, 0, 0)
#define RAW2(n, a, b) raw6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define RAW3(n, a, b, c) raw6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define RAW4(n, a, b, c, d) raw6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* x86-64 numbers, spelled out: old headers may not name the newer ones. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_RT_SIGACTION 13
#define NR_RT_SIGPROCMASK 14
#define NR_DUP2 33
#define NR_GETPID 39
#define NR_EXECVE 59
#define NR_EXIT 60
#define NR_FCNTL 72
#define NR_CHDIR 80
#define NR_SETPGID 109
#define NR_GETPPID 110
#define NR_SETRESUID 117
#define NR_SETRESGID 119
#define NR_SETGROUPS 116
#define NR_PRCTL 157
#define NR_PRLIMIT64 302
#define NR_FUTEX 202
#define NR_UNSHARE 272
#define NR_CLOSE_RANGE 436
#define SEED_FUTEX_WAKE 1
#define SEED_CLOSE_RANGE_UNSHARE (1U << 1)

#if defined(__has_attribute)
#if __has_attribute(no_stack_protector)
#define SEED_NOSSP __attribute__((no_stack_protector))
#endif
#endif
#ifndef SEED_NOSSP
#define SEED_NOSSP
#endif

struct kernel_sigaction {
    unsigned long handler, flags, restorer, mask;
};

static void __attribute__((noreturn)) SEED_NOSSP
seed_fail(const struct seed_ctl *c, int stage, long err, int index)
{
    int report[3];
    report[0] = stage;
    report[1] = (int)(err < 0 ? -err : (err ? err : EIO));
    report[2] = index;
    (void)RAW3(NR_WRITE, c->report_w, report, sizeof report);
    for (;;)
        RAW1(NR_EXIT, 127);
}

/* Close [from, to] (to < 0: to the end). */
static void SEED_NOSSP
seed_close_span(const struct seed_ctl *c, long from, long to)
{
    long r;
    if (to >= 0 && to < from)
        return;
    r = RAW3(NR_CLOSE_RANGE, from, to < 0 ? ~0U : (unsigned long)to, 0);
    if (r == -ENOSYS) {
        long fd, end = to < 0 ? c->max_fd : to;
        for (fd = from; fd <= end; fd++)
            (void)RAW1(NR_CLOSE, fd);
    }
}

static void __attribute__((noreturn)) SEED_NOSSP
seed_main(void *arg)
{
    struct seed_ctl *c = arg;
    int i;
    long r;
    char go;

    /* 00. Born sharing the server's descriptor table: a table of its own first, with
     *     a copy of only the descriptors below keep_below (its own are there), not of
     *     the ~3 per job the server holds (copying them, then closing each, cost a
     *     birth ~0.1-0.2 ms of CPU at 500 jobs). Before Linux 5.9, a copy of it all. */
    if (c->keep_below > 0) {
        r = RAW3(NR_CLOSE_RANGE, c->keep_below, ~0U, SEED_CLOSE_RANGE_UNSHARE);
        if (r < 0)
            r = RAW1(NR_UNSHARE, CLONE_FILES);
        if (r < 0) { /* (still the server's table: nothing of it touched) */
            __atomic_store_n(&c->unshared, 2, __ATOMIC_RELEASE);
            (void)RAW3(NR_FUTEX, &c->unshared, SEED_FUTEX_WAKE, 1);
            for (;;)
                RAW1(NR_EXIT, 127);
        }
    }
    /* 0. A name of its own for ps -e and top (its comm; the job's at exec): its
     *    command line is the server's, in the memory both share. */
    (void)RAW2(NR_PRCTL, PR_SET_NAME, SEED_NAME);
    /* 1. Nothing of the server's but what the seed needs, first of all: other
     *    seeds' pipes (a seed holding another's report pipe would hide that
     *    one's exec), the state directory's lock (a server restarted after a
     *    crash must find it free). Sources out of 0..2 first, so no dup2 hits
     *    them; then stdin/stdout/stderr; then every gap closed. */
    if (c->go_r < 3 && (c->go_r = (int)RAW3(NR_FCNTL, c->go_r, F_DUPFD_CLOEXEC, 3)) < 0)
        for (;;)
            RAW1(NR_EXIT, 127);
    if (c->report_w < 3 &&
        (c->report_w = (int)RAW3(NR_FCNTL, c->report_w, F_DUPFD_CLOEXEC, 3)) < 0)
        for (;;)
            RAW1(NR_EXIT, 127);
    for (i = 0; i < c->n_cgroup_fds; i++) {
        if (c->cgroup_fds[i] < 3) {
            r = RAW3(NR_FCNTL, c->cgroup_fds[i], F_DUPFD_CLOEXEC, 3);
            if (r < 0)
                seed_fail(c, STAGE_CGROUP, r, i);
            c->cgroup_fds[i] = (int)r;
        }
    }
    for (i = 0; i < 3; i++) {
        if (c->fds[i] < 3) {
            r = RAW3(NR_FCNTL, c->fds[i], F_DUPFD_CLOEXEC, 3);
            if (r < 0)
                seed_fail(c, STAGE_FDS, r, i);
            c->fds[i] = (int)r;
        }
    }
    for (i = 0; i < 3; i++) {
        r = RAW2(NR_DUP2, c->fds[i], i);
        if (r < 0)
            seed_fail(c, STAGE_FDS, r, i);
    }
    {
        int keep[SEED_MAX_GROUPS + 2], n = 0, j, from = 3;
        /* Sorted as they go in (insertion): a plain copy loop would be compiled
         * into a call of libc's memcpy through the PLT, which no code here may
         * make (test_seed checks the machine code for calls). */
        for (i = -2; i < c->n_cgroup_fds; i++) {
            int v = i == -2 ? c->go_r : i == -1 ? c->report_w : c->cgroup_fds[i];
            for (j = n; j > 0 && keep[j - 1] > v; j--)
                keep[j] = keep[j - 1];
            keep[j] = v;
            n++;
        }
        for (i = 0; i < n; i++) {
            seed_close_span(c, from, keep[i] - 1);
            if (keep[i] + 1 > from)
                from = keep[i] + 1;
        }
        seed_close_span(c, from, -1);
    }
    /*    Only its own descriptors left: the planting thread may go on (with a table of
     *    its own, this is its "born" pipe's EOF). */
    if (c->keep_below > 0) {
        __atomic_store_n(&c->unshared, 1, __ATOMIC_RELEASE);
        (void)RAW3(NR_FUTEX, &c->unshared, SEED_FUTEX_WAKE, 1);
    }
    /* 2. Every group of the job, before anything of the command (the clone
     *    joined the v2 one). */
    for (i = 0; i < c->n_cgroup_fds; i++) {
        if (!(i == c->into_index && c->joined_by_clone)) {
            r = RAW3(NR_WRITE, c->cgroup_fds[i], "0", 1);
            if (r != 1)
                seed_fail(c, STAGE_CGROUP, r, i);
        }
    }
    for (i = 0; i < c->n_cgroup_fds; i++)
        (void)RAW1(NR_CLOSE, c->cgroup_fds[i]);
    /* 3. The soft RLIMIT_NOFILE the server started with. */
    if (c->nofile_soft >= 0) {
        struct rlimit lim;
        if (RAW4(NR_PRLIMIT64, 0, RLIMIT_NOFILE, 0, &lim) < 0)
            seed_fail(c, STAGE_RLIMIT, EIO, 0);
        if ((rlim_t)c->nofile_soft < lim.rlim_cur) {
            lim.rlim_cur = (rlim_t)c->nofile_soft;
            r = RAW4(NR_PRLIMIT64, 0, RLIMIT_NOFILE, &lim, 0);
            if (r < 0)
                seed_fail(c, STAGE_RLIMIT, r, 0);
        }
    }
    /* 4. A process group of its own: the job's. */
    r = RAW2(NR_SETPGID, 0, 0);
    if (r < 0)
        seed_fail(c, STAGE_SESSION, r, 0);
    /* 5. Default dispositions (the server ignores SIGPIPE, which exec keeps), while
     *    every signal is still blocked: no handler of the server's ever runs here
     *    (the seed has a copy of them, not the server's table: no CLONE_SIGHAND). */
    {
        struct kernel_sigaction dfl = {0, 0, 0, 0};
        int sig;
        for (sig = 1; sig <= 64; sig++) {
            if (sig != SIGKILL && sig != SIGSTOP)
                (void)RAW4(NR_RT_SIGACTION, sig, &dfl, 0, 8);
        }
    }
    /* 6. Wait for the command. EOF: the server is gone or gave the seed up. */
    do {
        r = RAW3(NR_READ, c->go_r, &go, 1);
    } while (r == -EINTR);
    if (r != 1)
        for (;;)
            RAW1(NR_EXIT, 0);
    (void)RAW1(NR_CLOSE, c->go_r);
    /* The user: groups, gid, uid (each needs the privilege the next one drops). */
    if (c->n_groups >= 0 && (r = RAW2(NR_SETGROUPS, c->n_groups, c->groups)) < 0)
        seed_fail(c, STAGE_SETGROUPS, r, 0);
    if (c->gid >= 0 && (r = RAW3(NR_SETRESGID, c->gid, c->gid, c->gid)) < 0)
        seed_fail(c, STAGE_SETGID, r, 0);
    if (c->uid >= 0 && (r = RAW3(NR_SETRESUID, c->uid, c->uid, c->uid)) < 0)
        seed_fail(c, STAGE_SETUID, r, 0);
    if (c->cwd != NULL && (r = RAW1(NR_CHDIR, c->cwd)) < 0)
        seed_fail(c, STAGE_CHDIR, r, 0);
    if (c->pdeathsig) {
        if ((r = RAW2(NR_PRCTL, PR_SET_PDEATHSIG, c->pdeathsig)) < 0)
            seed_fail(c, STAGE_PDEATHSIG, r, 0);
        if (RAW1(NR_GETPPID, 0) != c->parent)
            seed_fail(c, STAGE_PARENT_GONE, ESRCH, 0);
    }
    /* 7. No signal blocked (their dispositions are the defaults since step 5). */
    {
        unsigned long none = 0;
        (void)RAW4(NR_RT_SIGPROCMASK, SIG_SETMASK, &none, 0, 8);
    }
    /* 8. execve along the candidates (execvp's rules, as spawn). */
    {
        long saved = 0;
        char **path;
        for (path = c->paths; *path != NULL; path++) {
            r = RAW3(NR_EXECVE, *path, c->argv, c->envp);
            if (r == -EACCES) {
                saved = EACCES;
            } else if (r != -ENOENT && r != -ENOTDIR) {
                saved = -r;
                break;
            }
        }
        seed_fail(c, STAGE_EXEC, saved ? saved : ENOENT, 0);
    }
}
#endif /* __x86_64__ */

typedef struct {
    PyObject_HEAD
    pid_t pid;
    int go_fd;     /* write end of the go pipe, -1 once the go byte is written */
    int report_fd; /* read end of the report pipe (non-blocking), -1 once at EOF */
    char *block;   /* stack + TLS + ctl, shared with the child */
    char *params;  /* the command's strings and arrays */
    size_t params_size;
    int report[3];
    size_t report_got;
    int done; /* EOF seen or the child reaped: the memory is ours again */
} SeedObject;

/* Blocks of seeds done with them (exec'd, exited or reaped), for the next plants to
 * take: unmapping one at a Start's EOF cost the event loop ~30 us (two munmaps and
 * their TLB shootdowns), and go a mmap of its own. At most SEED_SPARES are kept
 * (a few touched pages each: the stack's top, the thread pointer's and control pages,
 * the command's); the rest are unmapped. Used with the GIL held only (collect, kill
 * and dealloc on the loop; plant in the refill's thread before it lets the GIL go). */
#define SEED_SPARES 8
static char *seed_spare[SEED_SPARES];
static int seed_spares;

static char *
seed_block(void)
{
    char *block;
    if (seed_spares > 0) {
        block = seed_spare[--seed_spares];
        /* The control page zeroed, as a fresh mapping gives it. The TLS area is as it
         * was: the child never touches it (no %fs in its code, a test says), so it
         * holds zeros and the thread pointer, which plant writes again. */
        memset(block + SEED_STACK + SEED_TLS, 0, SEED_CTL);
        return block;
    }
    return mmap(NULL, SEED_BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
                -1, 0);
}

static void
seed_release(SeedObject *s)
{
    if (s->params != NULL && s->params_size != 0)
        munmap(s->params, s->params_size);
    s->params = NULL;
    if (s->block != NULL) {
        if (seed_spares < SEED_SPARES)
            seed_spare[seed_spares++] = s->block;
        else
            munmap(s->block, SEED_BLOCK);
        s->block = NULL;
    }
}

static void
seed_close_fds(SeedObject *s)
{
    if (s->go_fd >= 0) {
        close(s->go_fd);
        s->go_fd = -1;
    }
    if (s->report_fd >= 0) {
        close(s->report_fd);
        s->report_fd = -1;
    }
}

static void
seed_dealloc(SeedObject *s)
{
    seed_close_fds(s);
    if (s->done)
        seed_release(s);
    /* else the child may still run in that memory: leave it (never expected:
     * _spawn.Seed kills and reaps an unused seed). */
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyTypeObject SeedType;

/* A seed's birth, every system call of it with the GIL released: its go and report
 * pipes (and a "born" pipe without the slots), the clone, and the wait until the child
 * has closed its copies of the server's descriptors. */
struct seed_birth {
    /* In. */
    const int *cgroup_fds;
    int n_cgroup_fds;
    int fds[3]; /* its stdin, stdout, stderr (the caller's: it closes them) */
    long nofile_soft, max_fd;
    char *block;
    /* Out: err 0, or err and what (the step), nothing left open and no child. */
    int err;
    const char *what;
    pid_t pid;
    int go_fd, report_fd;
    long long t0, t1; /* CLOCK_BOOTTIME (ns) just before and after the clone */
};

#ifdef HAVE_SEED
static long long
boottime_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_BOOTTIME, &ts) < 0)
        return -1;
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* How long the planting thread waits for a new seed to close its copies of our
 * descriptors before it asks whether the seed was stopped (it takes microseconds). */
#define SEED_BIRTH_PATIENCE_MS 100

/* Whether our child ``pid`` is stopped now (one waitid that consumes nothing). */
static int
seed_stopped(pid_t pid)
{
    siginfo_t info;
    memset(&info, 0, sizeof info);
    return waitid(P_PID, (id_t)pid, &info, WSTOPPED | WNOHANG | WNOWAIT) == 0 &&
           info.si_pid == pid && info.si_code == CLD_STOPPED;
}

/* Whether our child ``pid`` has exited (not reaped: WNOWAIT). */
static int
seed_exited(pid_t pid)
{
    siginfo_t info;
    memset(&info, 0, sizeof info);
    return waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
           info.si_pid == pid;
}

/* Low descriptor numbers held for seeds' births: between births each holds /dev/null;
 * a birth puts the seed's own descriptors there (dup3), so that a seed born sharing
 * the server's table (CLONE_FILES) takes a copy of only the descriptors below the
 * highest, however many jobs the server holds. Reserved by the first births (the
 * lowest numbers free then), as many as a birth has needed; never given back. Births
 * run in worker threads without the GIL: one at a time holds them. */
#define SEED_SLOTS (6 + SEED_MAX_GROUPS)
static pthread_mutex_t seed_slots_lock = PTHREAD_MUTEX_INITIALIZER;
static int seed_slot[SEED_SLOTS];
static int seed_n_slots;
static int seed_filler = -1;

/* Lock the slots with at least n of them reserved: 0, or -1 (errno) and unlocked. */
static int
seed_slots_take(int n)
{
    pthread_mutex_lock(&seed_slots_lock);
    if (seed_filler < 0)
        seed_filler = open("/dev/null", O_RDONLY | O_CLOEXEC);
    while (seed_filler >= 0 && seed_n_slots < n) {
        int fd = fcntl(seed_filler, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
            break;
        seed_slot[seed_n_slots++] = fd;
    }
    if (seed_filler < 0 || seed_n_slots < n) {
        int saved = errno;
        pthread_mutex_unlock(&seed_slots_lock);
        errno = saved;
        return -1;
    }
    return 0;
}

/* The first n slots hold /dev/null again (the server's references to the seed's
 * descriptors dropped), and are free for the next birth. */
static void
seed_slots_give(int n)
{
    int i;
    for (i = 0; i < n; i++)
        (void)dup3(seed_filler, seed_slot[i], O_CLOEXEC);
    pthread_mutex_unlock(&seed_slots_lock);
}

/* Wait until a seed born sharing our table has a table of its own and has closed all
 * but its own descriptors there (1; 2: it could not make one and exits), has exited
 * before (3), or is stopped before (-1: the caller kills it). Every
 * SEED_BIRTH_PATIENCE_MS, asks which. */
static int
seed_wait_unshared(struct seed_ctl *c, pid_t pid)
{
    for (;;) {
        struct timespec ts = {0, SEED_BIRTH_PATIENCE_MS * 1000000L};
        int v = __atomic_load_n(&c->unshared, __ATOMIC_ACQUIRE);
        if (v != 0)
            return v;
        if (syscall(SYS_futex, &c->unshared, 0 /* FUTEX_WAIT */, 0, &ts, NULL, 0) < 0 &&
            errno == ETIMEDOUT) {
            if (__atomic_load_n(&c->unshared, __ATOMIC_ACQUIRE) != 0)
                continue;
            if (seed_stopped(pid))
                return -1;
            if (seed_exited(pid))
                return 3;
        }
    }
}

static void
seed_birth(struct seed_birth *b)
{
    int go[2] = {-1, -1}, rep[2] = {-1, -1}, born[2] = {-1, -1};
    struct seed_ctl *c;
    struct clone_args_v2 cargs;
    sigset_t all, old;
    long ret;
    int i, slots = 0;

    b->err = 0;
    b->pid = -1;
    b->go_fd = b->report_fd = -1;
    if (b->n_cgroup_fds > SEED_MAX_GROUPS) {
        b->err = E2BIG;
        b->what = "too many cgroup fds";
        return;
    }
    if (pipe2(go, O_CLOEXEC) < 0 || pipe2(rep, O_CLOEXEC | O_NONBLOCK) < 0) {
        b->err = errno;
        b->what = "pipe2";
        goto fail;
    }
    c = (struct seed_ctl *)(b->block + SEED_STACK + SEED_TLS);
    c->go_r = go[0];
    c->report_w = rep[1];
    for (i = 0; i < 3; i++)
        c->fds[i] = b->fds[i];
    c->n_cgroup_fds = b->n_cgroup_fds;
    c->into_index = -1;
    for (i = 0; i < b->n_cgroup_fds; i++) {
        struct stat st;
        c->cgroup_fds[i] = b->cgroup_fds[i];
        if (c->into_index < 0 && fstat(b->cgroup_fds[i], &st) == 0 && S_ISDIR(st.st_mode))
            c->into_index = i;
    }
    c->nofile_soft = b->nofile_soft;
    c->max_fd = b->max_fd;
    c->n_groups = -1;
    c->uid = c->gid = -1;
    /* The thread pointer: x86-64's TCB starts with a pointer to itself. */
    *(void **)(b->block + SEED_STACK + SEED_TP_AT) = b->block + SEED_STACK + SEED_TP_AT;
    /* The seed's descriptors in the slots, for a birth that copies no more of the
     * server's table than the numbers below them (see seed_slots_take). Without them
     * (out of descriptors for the first slots), a birth as before: a copy of it all. */
    c->keep_below = 0;
    c->unshared = 0;
    if (seed_slots_take(5 + b->n_cgroup_fds) == 0) {
        int need = 5 + b->n_cgroup_fds, top = 0;
        for (i = 0; i < need; i++) {
            int src = i == 0   ? go[0]
                      : i == 1 ? rep[1]
                      : i < 5  ? b->fds[i - 2]
                               : b->cgroup_fds[i - 5];
            if (dup3(src, seed_slot[i], O_CLOEXEC) < 0)
                break;
            if (seed_slot[i] > top)
                top = seed_slot[i];
        }
        if (i < need) {
            seed_slots_give(need);
        } else {
            slots = need;
            c->go_r = seed_slot[0];
            c->report_w = seed_slot[1];
            for (i = 0; i < 3; i++)
                c->fds[i] = seed_slot[2 + i];
            for (i = 0; i < b->n_cgroup_fds; i++)
                c->cgroup_fds[i] = seed_slot[5 + i];
            c->keep_below = (unsigned int)top + 1;
        }
    }
    /* Without the slots, the child's closing is seen as EOF on a pipe of its own. */
    if (!slots && pipe2(born, O_CLOEXEC) < 0) {
        b->err = errno;
        b->what = "pipe2";
        goto fail;
    }

    memset(&cargs, 0, sizeof cargs);
    cargs.flags = CLONE_VM | CLONE_SETTLS | (slots ? CLONE_FILES : 0);
    cargs.exit_signal = SIGCHLD;
    cargs.stack = (unsigned long long)(uintptr_t)b->block;
    cargs.stack_size = SEED_STACK;
    cargs.tls = (unsigned long long)(uintptr_t)(b->block + SEED_STACK + SEED_TP_AT);
    if (c->into_index >= 0) {
        cargs.flags |= CLONE_INTO_CGROUP;
        cargs.cgroup = (unsigned long long)c->cgroup_fds[c->into_index];
        c->joined_by_clone = 1;
    }
    /* The child starts with every signal blocked (it inherits this mask). With
     * CLONE_INTO_CGROUP the clone takes the kernel's cgroup_mutex, which a cgroup.procs
     * write elsewhere holds through an RCU grace period (up to ~10 ms): the GIL is let
     * go by the caller; the child touches nothing of Python's. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    b->t0 = boottime_ns();
    ret = tw_clone3_run(&cargs, sizeof cargs, (void (*)(void *))seed_main, c);
    b->t1 = boottime_ns();
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ret < 0) {
        if (slots)
            seed_slots_give(slots);
        b->err = (int)-ret;
        b->what = "clone3";
        goto fail;
    }
    if (slots) {
        /* The slots are the seed's until it has a table of its own, and this thread
         * waits until it has closed all but its own there (as for "born" below). */
        int how = seed_wait_unshared(c, (pid_t)ret);
        seed_slots_give(slots);
        if (how < 0) {
            int status;
            (void)kill((pid_t)ret, SIGKILL);
            while (waitpid((pid_t)ret, &status, 0) < 0 && errno == EINTR)
                ;
            b->err = EINTR;
            b->what = "a seed stopped before it was planted";
            goto fail;
        }
    }
    close(go[0]);
    close(rep[1]);
    if (born[1] >= 0)
        close(born[1]);
    /* Without the slots: wait until the child has closed its copies of the server's descriptors (the write
     * end of "born" among them: EOF): until then it holds the state directory's lock (an
     * flock its copy shares), the listening socket, other seeds' pipes. Planted, a seed
     * holds nothing of the server's, whether or not the server dies next. A child
     * stopped before that (kill -STOP in its first microseconds) would keep this thread
     * (the places' refill, and so the server's shutdown) waiting until continued: every
     * SEED_BIRTH_PATIENCE_MS without EOF, it is asked whether it is stopped, and if so
     * killed and reaped (EINTR: no seed for this place). */
    if (born[0] >= 0) {
        char byte;
        ssize_t got;
        for (;;) {
            struct pollfd p = {born[0], POLLIN, 0};
            int ready = poll(&p, 1, SEED_BIRTH_PATIENCE_MS);
            if (ready == 0 && seed_stopped((pid_t)ret)) {
                int status;
                (void)kill((pid_t)ret, SIGKILL);
                while (waitpid((pid_t)ret, &status, 0) < 0 && errno == EINTR)
                    ;
                b->err = EINTR;
                b->what = "a seed stopped before it was planted";
                close(born[0]);
                born[0] = -1;
                go[0] = rep[1] = born[1] = -1; /* (closed above) */
                goto fail;
            }
            if (ready != 0 && !(ready < 0 && errno == EINTR))
                break; /* readable (EOF), or poll failed: read as before */
        }
        do {
            got = read(born[0], &byte, 1);
        } while (got < 0 && errno == EINTR);
        close(born[0]);
    }
    b->pid = (pid_t)ret;
    b->go_fd = go[1];
    b->report_fd = rep[0];
    return;
fail:
    for (i = 0; i < 2; i++) {
        if (go[i] >= 0)
            close(go[i]);
        if (rep[i] >= 0)
            close(rep[i]);
        if (born[i] >= 0)
            close(born[i]);
    }
}
#endif

static PyObject *
seed_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cgroup_o;
    int fds[3];
    long nofile_soft, max_fd;
    int *cgroup_fds = NULL;
    Py_ssize_t n_cgroup = 0;

    if (!PyArg_ParseTuple(args, "Oiiill:Seed", &cgroup_o, &fds[0], &fds[1], &fds[2],
                          &nofile_soft, &max_fd))
        return NULL;
#ifndef HAVE_SEED
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#else
    {
        struct seed_birth b;
        SeedObject *s;
        int i;
        if (int_array(cgroup_o, &n_cgroup, &cgroup_fds) < 0)
            return NULL;
        if (n_cgroup > SEED_MAX_GROUPS) {
            PyMem_Free(cgroup_fds);
            PyErr_SetString(PyExc_ValueError, "too many cgroup fds");
            return NULL;
        }
        s = (SeedObject *)type->tp_alloc(type, 0);
        if (s == NULL) {
            PyMem_Free(cgroup_fds);
            return NULL;
        }
        s->pid = -1;
        s->go_fd = s->report_fd = -1;
        s->block = seed_block();
        if (s->block == MAP_FAILED) {
            s->block = NULL;
            s->done = 1;
            Py_DECREF(s);
            PyMem_Free(cgroup_fds);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        b.cgroup_fds = cgroup_fds;
        b.n_cgroup_fds = (int)n_cgroup;
        for (i = 0; i < 3; i++)
            b.fds[i] = fds[i];
        b.nofile_soft = nofile_soft;
        b.max_fd = max_fd;
        b.block = s->block;
        Py_BEGIN_ALLOW_THREADS
        seed_birth(&b);
        Py_END_ALLOW_THREADS
        PyMem_Free(cgroup_fds);
        if (b.err != 0) {
            s->done = 1; /* no child: the memory is ours */
            Py_DECREF(s);
            errno = b.err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        s->pid = b.pid;
        s->go_fd = b.go_fd;
        s->report_fd = b.report_fd;
        return (PyObject *)s;
    }
#endif
}

/* ------------------------------------------------------------------------- *
 * A seed planted for a place by _cplace.make_place, in the call that makes the place
 * (one GIL release for all of it): the capsule "_seed_api" (see _cseed.h).
 * ------------------------------------------------------------------------- */

/* /proc/PID/stat's field 22 (the start time, in clock ticks after boot), -1 if not. */
static long long
proc_start_time(pid_t pid)
{
    char path[64], buf[1024];
    ssize_t got;
    const char *p;
    int fd, field;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    do {
        got = read(fd, buf, sizeof buf - 1);
    } while (got < 0 && errno == EINTR);
    close(fd);
    if (got <= 0)
        return -1;
    buf[got] = '\0';
    /* Field 2 (comm) is in parentheses and may hold spaces or ')': after the last. */
    p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ')
        return -1;
    p += 2; /* field 3 */
    for (field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    return strtoll(p, NULL, 10);
}

static void *
api_take_block(void)
{
#ifdef HAVE_SEED
    char *block = seed_block();
    return block == MAP_FAILED ? NULL : block;
#else
    errno = ENOSYS;
    return NULL;
#endif
}

static void
api_give_back(void *block)
{
    SeedObject s;
    if (block == NULL)
        return;
    memset(&s, 0, sizeof s);
    s.block = block;
    seed_release(&s);
}

#ifdef HAVE_SEED
/* The start time of a process cloned between t0 and t1 (CLOCK_BOOTTIME, ns): the
 * kernel stamps it (start_boottime) inside the clone, and /proc shows it in clock ticks,
 * rounded down; when both ends fall in the same tick, that tick is the one /proc says,
 * and no read of it is needed. -1 when they do not. */
static long long
tick_between(long long t0, long long t1)
{
    long hz = sysconf(_SC_CLK_TCK);
    long long per_tick;
    if (hz <= 0 || 1000000000LL % hz != 0 || t0 < 0 || t1 < t0)
        return -1;
    per_tick = 1000000000LL / hz;
    return t0 / per_tick == t1 / per_tick ? t0 / per_tick : -1;
}

/* Its stdout's or stderr's pipe, made bigger (fewer wakeups per byte of a fast writer);
 * the read end (the server's) non-blocking, as the runner reads it, so the loop sets
 * nothing when a Start takes the seed (the job's end stays blocking). */
static int
output_pipe(int fds[2], const int *sizes, int n_sizes)
{
    int i;
    if (pipe2(fds, O_CLOEXEC) < 0)
        return -1;
    if (fcntl(fds[0], F_SETFL, O_NONBLOCK) < 0) {
        int saved = errno;
        close(fds[0]);
        close(fds[1]);
        fds[0] = fds[1] = -1;
        errno = saved;
        return -1;
    }
    for (i = 0; i < n_sizes; i++) {
        if (fcntl(fds[0], F_SETPIPE_SZ, sizes[i]) >= 0)
            break;
    }
    return 0;
}

#endif

static void
api_plant(struct tw_seed_plant *p)
{
#ifdef HAVE_SEED
    int out[2] = {-1, -1}, err[2] = {-1, -1}, null = -1, i;
    struct seed_birth b;
    struct rlimit lim;

    p->err = 0;
    p->pid = p->go_fd = p->report_fd = p->pidfd = p->out_r = p->err_r = -1;
    p->start_time = -1;
    if (output_pipe(out, p->pipe_sizes, p->n_pipe_sizes) < 0 ||
        output_pipe(err, p->pipe_sizes, p->n_pipe_sizes) < 0) {
        p->err = errno;
        p->what = "pipe2";
        goto fail;
    }
    null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0) {
        p->err = errno;
        p->what = "/dev/null";
        goto fail;
    }
    b.cgroup_fds = p->cgroup_fds;
    b.n_cgroup_fds = p->n_cgroup_fds;
    b.fds[0] = null;
    b.fds[1] = out[1];
    b.fds[2] = err[1];
    b.nofile_soft = p->nofile_soft;
    b.max_fd = 65535; /* (close_range's fallback: the soft limit, as _spawn.Seed.plant) */
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY)
        b.max_fd = lim.rlim_cur < (1 << 20) ? (long)lim.rlim_cur : (1 << 20);
    b.block = p->block;
    seed_birth(&b);
    if (b.err != 0) {
        p->err = b.err;
        p->what = b.what;
        goto fail;
    }
    close(null);
    close(out[1]);
    close(err[1]);
    null = out[1] = err[1] = -1;
    p->pidfd = (int)syscall(SYS_pidfd_open, b.pid, 0);
    if (p->pidfd < 0) {
        int status;
        p->err = errno;
        p->what = "pidfd_open";
        (void)kill(b.pid, SIGKILL);
        while (waitpid(b.pid, &status, 0) < 0 && errno == EINTR)
            ;
        close(b.go_fd);
        close(b.report_fd);
        goto fail;
    }
    p->pid = b.pid;
    p->go_fd = b.go_fd;
    p->report_fd = b.report_fd;
    p->out_r = out[0];
    p->err_r = err[0];
    p->start_time = tick_between(b.t0, b.t1);
    if (p->start_time < 0)
        p->start_time = proc_start_time(b.pid);
    return;
fail:
    for (i = 0; i < 2; i++) {
        if (out[i] >= 0)
            close(out[i]);
        if (err[i] >= 0)
            close(err[i]);
    }
    if (null >= 0)
        close(null);
#else
    p->err = ENOSYS;
    p->what = "clone3";
#endif
}

static PyObject *
api_adopt(struct tw_seed_plant *p)
{
    SeedObject *s = (SeedObject *)SeedType.tp_alloc(&SeedType, 0);
    if (s == NULL) {
        int status;
        (void)kill(p->pid, SIGKILL);
        while (waitpid(p->pid, &status, 0) < 0 && errno == EINTR)
            ;
        close(p->go_fd);
        close(p->report_fd);
        close(p->pidfd);
        close(p->out_r);
        close(p->err_r);
        api_give_back(p->block);
        return NULL;
    }
    s->pid = p->pid;
    s->go_fd = p->go_fd;
    s->report_fd = p->report_fd;
    s->block = p->block;
    return (PyObject *)s;
}

static struct tw_seed_api seed_api = {
    TW_SEED_API_VERSION, api_take_block, api_plant, api_adopt, api_give_back,
};

PyDoc_STRVAR(cspawn_proc_start_time_doc,
"proc_start_time(pid) -> int | None\n\n"
"When ``pid`` started, in clock ticks after boot (/proc/PID/stat's field 22, read in\n"
"C): what a place's seed gets when its clone straddled a tick.");

static PyObject *
cspawn_proc_start_time(PyObject *self, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    long long ticks;
    if (pid == -1 && PyErr_Occurred())
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    ticks = proc_start_time((pid_t)pid);
    Py_END_ALLOW_THREADS
    if (ticks < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(ticks);
}

/* The size of n strings and their NULL-terminated array in the params block. */
static int
seed_strings(PyObject *seq, PyObject **fast, size_t *size)
{
    Py_ssize_t n, i;
    *fast = PySequence_Fast(seq, "expected a sequence of bytes");
    if (*fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(*fast);
    *size += ((size_t)n + 1) * sizeof(char *);
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(*fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "expected bytes");
            return -1;
        }
        *size += (size_t)PyBytes_GET_SIZE(item) + 1;
    }
    return 0;
}

/* Copy fast's strings into the block at *at; return the array. */
static char **
seed_copy(PyObject *fast, char **at)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), i;
    char **array = (char **)*at;
    char *text = *at + ((size_t)n + 1) * sizeof(char *);
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        size_t len = (size_t)PyBytes_GET_SIZE(item);
        memcpy(text, PyBytes_AS_STRING(item), len + 1);
        array[i] = text;
        text += len + 1;
    }
    array[n] = NULL;
    *at = text;
    return array;
}

PyDoc_STRVAR(seed_go_doc,
"go(paths, argv, envp, cwd, uid, gid, groups, pdeathsig, parent)\n\n"
"Hand the seed its command and let it exec. The outcome comes from collect().");

static PyObject *
seed_go(SeedObject *s, PyObject *args)
{
#ifndef HAVE_SEED
    errno = ENOSYS;
    return PyErr_SetFromErrno(PyExc_OSError);
#else
    PyObject *paths_o, *argv_o, *envp_o, *cwd_o, *groups_o;
    PyObject *paths = NULL, *argv = NULL, *envp = NULL, *groups = NULL, *result = NULL;
    long uid, gid;
    int pdeathsig;
    long parent;
    size_t size = 0, cwd_len = 0;
    Py_ssize_t n_groups = -1, i;
    struct seed_ctl *c;
    char *at;

    if (!PyArg_ParseTuple(args, "OOOOllOil:go", &paths_o, &argv_o, &envp_o, &cwd_o, &uid, &gid,
                          &groups_o, &pdeathsig, &parent))
        return NULL;
    if (s->go_fd < 0 || s->block == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this seed was used already");
        return NULL;
    }
    if (cwd_o != Py_None && !PyBytes_Check(cwd_o)) {
        PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
        return NULL;
    }
    if (seed_strings(paths_o, &paths, &size) < 0 || seed_strings(argv_o, &argv, &size) < 0 ||
        seed_strings(envp_o, &envp, &size) < 0)
        goto done;
    if (groups_o != Py_None) {
        groups = PySequence_Fast(groups_o, "expected a sequence of int");
        if (groups == NULL)
            goto done;
        n_groups = PySequence_Fast_GET_SIZE(groups);
    }
    if (cwd_o != Py_None)
        cwd_len = (size_t)PyBytes_GET_SIZE(cwd_o) + 1;
    size += (n_groups > 0 ? (size_t)n_groups : 0) * sizeof(gid_t) + cwd_len + 64;
    if (size <= SEED_PARAMS) {
        at = s->block + SEED_STACK + SEED_TLS + SEED_CTL; /* no mapping of its own */
        s->params = at;
        s->params_size = 0;
    } else {
        size = (size + 4095) & ~(size_t)4095;
        at = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (at == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        s->params = at;
        s->params_size = size;
    }
    c = (struct seed_ctl *)(s->block + SEED_STACK + SEED_TLS);
    c->groups = NULL;
    if (n_groups > 0) {
        c->groups = (gid_t *)at;
        for (i = 0; i < n_groups; i++) {
            long g = PyLong_AsLong(PySequence_Fast_GET_ITEM(groups, i));
            if (g == -1 && PyErr_Occurred())
                goto done; /* nothing sent: the seed still waits */
            c->groups[i] = (gid_t)g;
        }
        at += (size_t)n_groups * sizeof(gid_t);
    }
    at = (char *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    c->paths = seed_copy(paths, &at);
    at = (char *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    c->argv = seed_copy(argv, &at);
    at = (char *)(((uintptr_t)at + 7) & ~(uintptr_t)7);
    c->envp = seed_copy(envp, &at);
    c->cwd = NULL;
    if (cwd_len) {
        memcpy(at, PyBytes_AS_STRING(cwd_o), cwd_len);
        c->cwd = at;
    }
    c->n_groups = n_groups;
    c->uid = uid;
    c->gid = gid;
    c->pdeathsig = pdeathsig;
    c->parent = (pid_t)parent;
    /* The write is the barrier: the child reads all of this after it. EPIPE: the
     * seed died before its go (killed from outside): nothing of the command ran,
     * and the caller can run it another way (BrokenPipeError, the seed to kill). */
    {
        ssize_t w;
        int saved;
        do {
            w = write(s->go_fd, "g", 1);
        } while (w < 0 && errno == EINTR);
        saved = errno;
        close(s->go_fd);
        s->go_fd = -1;
        if (w != 1) {
            errno = w < 0 ? saved : EIO;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    Py_XDECREF(paths);
    Py_XDECREF(argv);
    Py_XDECREF(envp);
    Py_XDECREF(groups);
    return result;
#endif
}

PyDoc_STRVAR(seed_collect_doc,
"collect() -> None | (stage, errno, index)\n\n"
"None while the report pipe is open (call again once it is readable); then\n"
"(0, 0, 0) if the command was exec'd, or the failure the child reported\n"
"(stage -1: it died without a word). Frees the seed's memory.");

static PyObject *
seed_collect(SeedObject *s, PyObject *unused)
{
    for (;;) {
        char buf[sizeof s->report];
        ssize_t got;
        if (s->report_fd < 0)
            break;
        got = read(s->report_fd, buf, sizeof buf);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                Py_RETURN_NONE;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (got == 0) {
            close(s->report_fd);
            s->report_fd = -1;
            s->done = 1; /* exec'd or exited: the child's mm is not ours any more */
            seed_release(s);
            break;
        }
        if (s->report_got + (size_t)got <= sizeof s->report) {
            memcpy((char *)s->report + s->report_got, buf, (size_t)got);
            s->report_got += (size_t)got;
        }
    }
    if (s->report_got == sizeof s->report)
        return Py_BuildValue("(iii)", s->report[0], s->report[1], s->report[2]);
    if (s->go_fd >= 0 || s->report_got != 0)
        return Py_BuildValue("(iii)", -1, EIO, 0); /* died before the go, or a torn report */
    return Py_BuildValue("(iii)", 0, 0, 0);
}

PyDoc_STRVAR(seed_kill_doc,
"kill()\n\n"
"SIGKILL the unused seed and reap it (blocking), then free its memory.");

static PyObject *
seed_kill(SeedObject *s, PyObject *unused)
{
    if (s->pid > 0 && !s->done) {
        int status;
        pid_t got;
        (void)kill(s->pid, SIGKILL);
        Py_BEGIN_ALLOW_THREADS
        do {
            got = waitpid(s->pid, &status, 0);
        } while (got < 0 && errno == EINTR);
        Py_END_ALLOW_THREADS
        if (got == s->pid || errno == ECHILD) {
            s->done = 1;
            seed_release(s);
        }
    }
    seed_close_fds(s);
    Py_RETURN_NONE;
}

static PyMethodDef seed_methods[] = {
    {"go", (PyCFunction)seed_go, METH_VARARGS, seed_go_doc},
    {"collect", (PyCFunction)seed_collect, METH_NOARGS, seed_collect_doc},
    {"kill", (PyCFunction)seed_kill, METH_NOARGS, seed_kill_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef seed_members[] = {
    {"pid", T_INT, offsetof(SeedObject, pid), READONLY, "the seed's pid (the job's)"},
    {"go_fd", T_INT, offsetof(SeedObject, go_fd), READONLY, "the go pipe; -1 once used"},
    {"report_fd", T_INT, offsetof(SeedObject, report_fd), READONLY,
     "readable when collect() has news; -1 after EOF"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SeedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "trio_worker._host._cspawn.Seed",
    .tp_basicsize = sizeof(SeedObject),
    .tp_dealloc = (destructor)seed_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Seed(cgroup_fds, stdin, stdout, stderr, nofile_soft, max_fd): a process "
              "born in its groups, waiting for its command (see the comment above).",
    .tp_methods = seed_methods,
    .tp_members = seed_members,
    .tp_new = seed_new,
};

PyDoc_STRVAR(cspawn_release_seed_slots_doc,
             "release_seed_slots(): close the low descriptors seeds' births hold (a\n"
             "supervisor's end: the next birth takes them again).");

static PyObject *
cspawn_release_seed_slots(PyObject *self, PyObject *unused)
{
#ifdef HAVE_SEED
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&seed_slots_lock);
    while (seed_n_slots > 0)
        close(seed_slot[--seed_n_slots]);
    if (seed_filler >= 0)
        close(seed_filler);
    seed_filler = -1;
    pthread_mutex_unlock(&seed_slots_lock);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cspawn_seed_slots_doc,
             "seed_slots(): the descriptors seeds' births hold now (the slots and the\n"
             "/dev/null they hold between births), for tests that count descriptors.");

static PyObject *
cspawn_seed_slots(PyObject *self, PyObject *unused)
{
    PyObject *out = PyTuple_New(0);
#ifdef HAVE_SEED
    int fds[SEED_SLOTS + 1], n = 0, i;
    pthread_mutex_lock(&seed_slots_lock); /* (held only around a birth's clone) */
    for (i = 0; i < seed_n_slots; i++)
        fds[n++] = seed_slot[i];
    if (seed_filler >= 0)
        fds[n++] = seed_filler;
    pthread_mutex_unlock(&seed_slots_lock);
    Py_XDECREF(out);
    out = PyTuple_New(n);
    for (i = 0; out != NULL && i < n; i++) {
        PyObject *fd = PyLong_FromLong(fds[i]);
        if (fd == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, fd);
    }
#endif
    return out;
}

static PyMethodDef methods[] = {
    {"spawn", cspawn_spawn, METH_VARARGS, spawn_doc},
    {"seed_slots", cspawn_seed_slots, METH_NOARGS, cspawn_seed_slots_doc},
    {"release_seed_slots", cspawn_release_seed_slots, METH_NOARGS,
     cspawn_release_seed_slots_doc},
    {"proc_start_time", cspawn_proc_start_time, METH_O, cspawn_proc_start_time_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cspawn", "vfork + exec for job processes (see _spawn.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cspawn(void)
{
    PyObject *m;
    if (PyType_Ready(&SeedType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SeedType);
    if (PyModule_AddObject(m, "Seed", (PyObject *)&SeedType) < 0) {
        Py_DECREF(&SeedType);
        Py_DECREF(m);
        return NULL;
    }
    {
        PyObject *api = PyCapsule_New(&seed_api, TW_SEED_API_CAPSULE, NULL);
        if (api == NULL || PyModule_AddObject(m, "_seed_api", api) < 0) {
            Py_XDECREF(api);
            Py_DECREF(m);
            return NULL;
        }
    }
#ifdef HAVE_SEED
    if (PyModule_AddIntConstant(m, "HAVE_SEED", 1) < 0) {
#else
    if (PyModule_AddIntConstant(m, "HAVE_SEED", 0) < 0) {
#endif
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
