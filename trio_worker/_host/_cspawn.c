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
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
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
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        /* Older kernels: nothing to do, the server opens everything CLOEXEC. */
    }
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

/* vfork in a frame of its own: nothing the caller keeps in registers can be
 * clobbered by the child. Returns the pid, or -1 with errno set. */
static pid_t __attribute__((noinline))
start_child(const struct plan *p, volatile struct report *r)
{
    sigset_t all, old;
    pid_t pid;
    int saved;
    /* No handler of the parent may run in the child, which shares its memory. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(p, r);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
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

static PyObject *
cspawn_spawn(PyObject *self, PyObject *args)
{
    PyObject *paths_o, *argv_o, *envp_o, *cwd_o, *cgroup_o, *groups_o;
    PyObject *keep_paths = NULL, *keep_argv = NULL, *keep_envp = NULL;
    struct plan p;
    volatile struct report r;
    int *groups_int = NULL;
    pid_t pid;
    PyObject *result = NULL;
    Py_ssize_t i;

    memset(&p, 0, sizeof p);
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

    r.stage = STAGE_OK;
    r.err = 0;
    r.index = 0;
    /* The GIL is let go while this thread is suspended (until the child's exec):
     * called from a worker thread, the event loop runs meanwhile. The child reads
     * only the plan, built above from objects the caller keeps alive. */
    {
        int saved = 0;
        Py_BEGIN_ALLOW_THREADS
        pid = start_child(&p, &r);
        saved = errno;
        if (pid > 0 && r.stage != STAGE_OK) {
            int status;
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        }
        Py_END_ALLOW_THREADS
        errno = saved;
    }
    if (pid < 0) {
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
