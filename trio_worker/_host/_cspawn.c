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
#include <sched.h> /* CLONE_VM, CLONE_VFORK */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

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

static PyMethodDef methods[] = {
    {"spawn", cspawn_spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cspawn", "vfork + exec for job processes (see _spawn.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cspawn(void)
{
    return PyModule_Create(&module);
}
