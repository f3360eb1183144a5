/* A job's place made, and ended jobs' groups removed, each in one call that lets the
 * GIL go, for trio_worker._host._place.
 *
 * Why C: the refill thread (trio_worker._jobs._launch) made a place with ~20 system
 * calls (a directory, its log files, a cgroup directory per hierarchy and what the
 * job joins each by) and removed an ended job's groups with one rmdir per hierarchy,
 * each call from Python: pathlib joins, per-hierarchy loops, exceptions. The thread
 * held the GIL between every two of them, and the event loop had to win it back
 * after each of its own system calls. Here the Python objects are read first, then
 * every system call runs with the GIL released.
 *
 * With a seed asked for, the place's seed is planted in the same GIL-free stretch, by
 * _cspawn.c's code (its capsule, _cseed.h): the refill's thread then takes the GIL
 * once per place, not once per system call of the seed's (pipes, /dev/null, the clone,
 * its pidfd and start time: ~12 calls from Python before).
 *
 * Nothing here runs in a child process: plain libc is fine (unlike _cspawn.c's seed).
 */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "_cseed.h"

/* Which step failed (mirrors _place.Step). */
enum { STEP_DIRECTORY = 1, STEP_FILE = 2, STEP_CGROUP = 3, STEP_JOIN = 4 };

/* A sequence of bytes as C strings: pointers into the bytes objects, which the
 * caller keeps alive (``fast``) while the GIL is released. */
static int
strings(PyObject *seq, PyObject **fast, const char ***out, Py_ssize_t **sizes, Py_ssize_t *n)
{
    Py_ssize_t i;
    *fast = PySequence_Fast(seq, "expected a sequence of bytes");
    if (*fast == NULL)
        return -1;
    *n = PySequence_Fast_GET_SIZE(*fast);
    *out = PyMem_Calloc((size_t)*n + 1, sizeof(char *));
    if (sizes != NULL)
        *sizes = PyMem_Calloc((size_t)*n + 1, sizeof(Py_ssize_t));
    if (*out == NULL || (sizes != NULL && *sizes == NULL)) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < *n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(*fast, i);
        if (item == Py_None && sizes != NULL) {
            (*out)[i] = NULL; /* (contents: an empty file) */
            continue;
        }
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "expected bytes");
            return -1;
        }
        (*out)[i] = PyBytes_AS_STRING(item);
        if (sizes != NULL)
            (*sizes)[i] = PyBytes_GET_SIZE(item);
        else if ((Py_ssize_t)strlen((*out)[i]) != PyBytes_GET_SIZE(item)) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte");
            return -1;
        }
    }
    return 0;
}

/* "dir/name" into buf; -1 (ENAMETOOLONG) if it does not fit. */
static int
join(char *buf, const char *dir, const char *name)
{
    int len = snprintf(buf, PATH_MAX, "%s/%s", dir, name);
    if (len < 0 || len >= PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

struct made {
    int step, err;
    char failed[PATH_MAX]; /* the path of the failed step */
};

/* Every system call of a place, the GIL released; on failure nothing is left and
 * ``m`` says what failed. */
static void
make(const char *directory, const char **files, const char **contents, Py_ssize_t *sizes,
     Py_ssize_t n_files, const char **groups, const int *procs, Py_ssize_t n_groups, int made,
     int *fds, struct made *m)
{
    char path[PATH_MAX];
    Py_ssize_t files_made = 0, groups_made = 0, opened = 0, i;
    m->step = 0;
    if (*directory != '\0' && mkdir(directory, 0700) < 0) {
        m->step = STEP_DIRECTORY;
        m->err = errno;
        snprintf(m->failed, PATH_MAX, "%s", directory);
        return;
    }
    for (i = 0; i < n_files; i++) {
        int fd;
        if (join(path, directory, files[i]) < 0 ||
            (fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600)) < 0) {
            m->step = STEP_FILE;
            m->err = errno;
            goto fail;
        }
        files_made++;
        if (contents[i] != NULL && sizes[i] > 0) {
            /* Written while the disk surely has room; a full disk must not stop the
             * job (the file stays, empty or short: its reader takes that as zeros). */
            ssize_t wrote;
            do {
                wrote = pwrite(fd, contents[i], (size_t)sizes[i], 0);
            } while (wrote < 0 && errno == EINTR);
        }
        close(fd);
    }
    for (i = 0; i < n_groups && !made; i++) {
        if (mkdir(groups[i], 0777) < 0) {
            m->step = STEP_CGROUP;
            m->err = errno;
            snprintf(path, PATH_MAX, "%s", groups[i]);
            goto fail;
        }
        groups_made++;
    }
    for (i = 0; i < n_groups; i++) {
        int fd;
        if (procs[i]) {
            fd = join(path, groups[i], "cgroup.procs") < 0 ? -1
                                                          : open(path, O_WRONLY | O_CLOEXEC);
        } else {
            snprintf(path, PATH_MAX, "%s", groups[i]);
            fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        }
        if (fd < 0) {
            m->step = STEP_JOIN;
            m->err = errno;
            goto fail;
        }
        fds[opened++] = fd;
    }
    return;
fail:
    snprintf(m->failed, PATH_MAX, "%s", path);
    while (opened > 0)
        close(fds[--opened]);
    while (groups_made > 0)
        (void)rmdir(groups[--groups_made]);
    while (files_made > 0) {
        files_made--;
        if (join(path, directory, files[files_made]) == 0)
            (void)unlink(path);
    }
    if (*directory != '\0')
        (void)rmdir(directory);
}

/* _cspawn's seed planting (_cseed.h), imported at the first place with a seed. */
static struct tw_seed_api *seed_api;

static struct tw_seed_api *
get_seed_api(void)
{
    if (seed_api == NULL) {
        struct tw_seed_api *api = PyCapsule_Import(TW_SEED_API_CAPSULE, 0);
        if (api == NULL)
            return NULL;
        if (api->version != TW_SEED_API_VERSION) {
            PyErr_SetString(PyExc_ImportError, "_cspawn's seed API is another version");
            return NULL;
        }
        seed_api = api;
    }
    return seed_api;
}

/* What a seed needs of make_place's caller: (nofile_soft, pipe_sizes). */
static int
seed_args(PyObject *seed_o, struct tw_seed_plant *p, int **sizes)
{
    PyObject *sizes_o, *fast;
    Py_ssize_t n, i;
    if (!PyArg_ParseTuple(seed_o, "lO:seed", &p->nofile_soft, &sizes_o))
        return -1;
    fast = PySequence_Fast(sizes_o, "expected a sequence of pipe sizes");
    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    *sizes = PyMem_Calloc((size_t)n + 1, sizeof(int));
    if (*sizes == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        long size = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (size == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        (*sizes)[i] = (int)size;
    }
    Py_DECREF(fast);
    p->pipe_sizes = *sizes;
    p->n_pipe_sizes = (int)n;
    return 0;
}

/* The seed's half of make_place's answer: (Seed, pidfd, stdout, stderr, start time) or
 * the OSError that says why there is none. */
static PyObject *
planted(struct tw_seed_api *api, struct tw_seed_plant *p)
{
    PyObject *seed;
    if (p->err != 0)
        return PyObject_CallFunction(PyExc_OSError, "iss", p->err, strerror(p->err), p->what);
    seed = api->adopt(p);
    if (seed == NULL)
        return NULL;
    if (p->start_time < 0)
        return Py_BuildValue("(NiiiO)", seed, p->pidfd, p->out_r, p->err_r, Py_None);
    return Py_BuildValue("(NiiiL)", seed, p->pidfd, p->out_r, p->err_r, p->start_time);
}

PyDoc_STRVAR(make_place_doc,
"make_place(directory, files, contents, groups, procs, seed=None, made=False)\n"
"    -> list[int] | (list[int], planted) | (step, errno, path)\n\n"
"mkdir ``directory`` (0700; none if empty: then no ``files``); create each of ``files``\n"
"in it (0600, empty, or with\n"
"its ``contents`` written at 0 if not None: a failed write is ignored); mkdir each of\n"
"``groups`` (not if ``made``: they exist, recycled, and a failure leaves them);\n"
"then open, for each group, its cgroup.procs for writing (``procs``\n"
"true) or the group's directory itself (false). Returns the fds, one per group,\n"
"close-on-exec. On failure nothing made is left, and the step (1 directory,\n"
"2 file, 3 cgroup, 4 join), errno and the path that failed are returned.\n\n"
"With ``seed`` (nofile_soft, pipe_sizes), the place's seed is planted too, joining\n"
"the groups by those fds (_cspawn's Seed): then (fds, planted), where planted is\n"
"(Seed, pidfd, stdout_r, stderr_r, start_time or None) and fds is empty (the seed\n"
"joined: they are closed), or the OSError that says why there is no seed (the place\n"
"is made all the same, with its fds).");

static PyObject *
make_place(PyObject *self, PyObject *args)
{
    PyObject *dir_o, *files_o, *contents_o, *groups_o, *procs_o, *seed_o = Py_None;
    PyObject *files_f = NULL, *contents_f = NULL, *groups_f = NULL, *procs_f = NULL;
    const char **files = NULL, **contents = NULL, **groups = NULL;
    Py_ssize_t *sizes = NULL, n_files = 0, n_contents = 0, n_groups = 0, i;
    int *procs = NULL, *fds = NULL, *pipe_sizes = NULL;
    struct made *m = NULL;
    struct tw_seed_api *api = NULL;
    struct tw_seed_plant plant;
    int no_block = 0;
    PyObject *result = NULL;
    const char *directory;
    int made = 0;

    if (!PyArg_ParseTuple(args, "yOOOO|Op:make_place", &directory, &files_o, &contents_o,
                          &groups_o, &procs_o, &seed_o, &made))
        return NULL;
    dir_o = PyTuple_GET_ITEM(args, 0);
    Py_INCREF(dir_o);
    memset(&plant, 0, sizeof plant);
    if (seed_o != Py_None &&
        ((api = get_seed_api()) == NULL || seed_args(seed_o, &plant, &pipe_sizes) < 0))
        goto done;
    if (strings(files_o, &files_f, &files, NULL, &n_files) < 0 ||
        strings(contents_o, &contents_f, &contents, &sizes, &n_contents) < 0 ||
        strings(groups_o, &groups_f, &groups, NULL, &n_groups) < 0)
        goto done;
    if (n_contents != n_files) {
        PyErr_SetString(PyExc_ValueError, "one content per file");
        goto done;
    }
    if (*directory == '\0' && n_files > 0) {
        PyErr_SetString(PyExc_ValueError, "files need a directory");
        goto done;
    }
    procs_f = PySequence_Fast(procs_o, "expected a sequence of bools");
    if (procs_f == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(procs_f) != n_groups) {
        PyErr_SetString(PyExc_ValueError, "one procs flag per group");
        goto done;
    }
    procs = PyMem_Calloc((size_t)n_groups + 1, sizeof(int));
    fds = PyMem_Calloc((size_t)n_groups + 1, sizeof(int));
    m = PyMem_Malloc(sizeof *m);
    if (procs == NULL || fds == NULL || m == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n_groups; i++) {
        int truth = PyObject_IsTrue(PySequence_Fast_GET_ITEM(procs_f, i));
        if (truth < 0)
            goto done;
        procs[i] = truth;
    }
    if (api != NULL && (plant.block = api->take_block()) == NULL)
        no_block = errno;
    Py_BEGIN_ALLOW_THREADS
    make(directory, files, contents, sizes, n_files, groups, procs, n_groups, made, fds, m);
    if (m->step == 0 && plant.block != NULL) {
        plant.cgroup_fds = fds;
        plant.n_cgroup_fds = (int)n_groups;
        api->plant(&plant);
    }
    Py_END_ALLOW_THREADS
    if (api != NULL && (m->step != 0 || plant.err != 0))
        api->give_back(plant.block);
    if (m->step != 0) {
        result = Py_BuildValue("(iiy)", m->step, m->err, m->failed);
        goto done;
    }
    if (api != NULL) {
        PyObject *seed;
        if (no_block) {
            plant.err = no_block;
            plant.what = "mmap";
        }
        seed = planted(api, &plant);
        if (seed != NULL && plant.err == 0) {
            /* The seed joined its groups (or holds its own copies): the place's
             * fds are done with. */
            for (i = 0; i < n_groups; i++)
                close(fds[i]);
            n_groups = 0;
        }
        if (seed == NULL) { /* (out of memory: the seed is gone, the place stays) */
            PyErr_Clear();
            seed = PyObject_CallFunction(PyExc_OSError, "is", ENOMEM, strerror(ENOMEM));
            if (seed == NULL)
                goto close_fds;
        }
        result = PyList_New(n_groups);
        if (result == NULL) {
            Py_DECREF(seed);
            goto close_fds;
        }
        for (i = 0; i < n_groups; i++) {
            PyObject *fd = PyLong_FromLong(fds[i]);
            if (fd == NULL) {
                Py_DECREF(seed);
                Py_CLEAR(result);
                goto close_fds;
            }
            PyList_SET_ITEM(result, i, fd);
        }
        result = Py_BuildValue("(NN)", result, seed);
        goto done;
    close_fds:
        for (i = 0; i < n_groups; i++)
            close(fds[i]);
        goto done;
    }
    result = PyList_New(n_groups);
    if (result == NULL) {
        for (i = 0; i < n_groups; i++)
            close(fds[i]);
        goto done;
    }
    for (i = 0; i < n_groups; i++) {
        PyObject *fd = PyLong_FromLong(fds[i]);
        if (fd == NULL) { /* (cannot happen for small ints) */
            Py_ssize_t j;
            for (j = i; j < n_groups; j++)
                close(fds[j]);
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, fd);
    }
done:
    Py_DECREF(dir_o);
    Py_XDECREF(files_f);
    Py_XDECREF(contents_f);
    Py_XDECREF(groups_f);
    Py_XDECREF(procs_f);
    PyMem_Free(files);
    PyMem_Free(contents);
    PyMem_Free(sizes);
    PyMem_Free(groups);
    PyMem_Free(procs);
    PyMem_Free(fds);
    PyMem_Free(m);
    PyMem_Free(pipe_sizes);
    return result;
}

PyDoc_STRVAR(remove_dirs_doc,
"remove_dirs(dirs) -> list[tuple[int, int]]\n\n"
"rmdir each of ``dirs``, in order; returns (index, errno) for each that failed\n"
"for another reason than not existing (a group with processes or subgroups:\n"
"the caller takes the slow way for those).");

static PyObject *
remove_dirs(PyObject *self, PyObject *arg)
{
    PyObject *fast = NULL, *result = NULL;
    const char **dirs = NULL;
    Py_ssize_t n = 0, i, n_failed = 0;
    int *errs = NULL;

    if (strings(arg, &fast, &dirs, NULL, &n) < 0)
        goto done;
    errs = PyMem_Calloc((size_t)n + 1, sizeof(int));
    if (errs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        if (rmdir(dirs[i]) < 0 && errno != ENOENT) {
            errs[i] = errno;
            n_failed++;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(0);
    if (result == NULL || n_failed == 0)
        goto done;
    for (i = 0; i < n; i++) {
        if (errs[i]) {
            PyObject *item = Py_BuildValue("(ni)", i, errs[i]);
            if (item == NULL || PyList_Append(result, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(result);
                goto done;
            }
            Py_DECREF(item);
        }
    }
done:
    Py_XDECREF(fast);
    PyMem_Free(dirs);
    PyMem_Free(errs);
    return result;
}

/* recycle's operations on a group's files (mirror _cgroups' _NO_SUBGROUPS...). */
enum { OP_NO_SUBGROUPS = 0, OP_AT_MOST = 1, OP_WRITE = 2, OP_READ = 3 };

/* One operation on every group: its path is head + the group's name + tail. */
struct op {
    int kind;
    const char *head, *tail, *key; /* key: a "key value" line's key, or "" for the whole
                                      file (OP_WRITE: the bytes written) */
    Py_ssize_t head_len, tail_len, key_len;
    long long value; /* OP_AT_MOST's bound */
};

/* The value ``key`` has in the cgroup file ``name`` of ``dir_fd`` ("key N" lines, or the
 * file's one number for an empty key); -1 if it cannot be read or has no such value. */
static int
file_value(int dir_fd, const char *name, const char *key, Py_ssize_t key_len, long long *value)
{
    char buf[4096], *at, *end;
    ssize_t got;
    int fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    do {
        got = read(fd, buf, sizeof buf - 1);
    } while (got < 0 && errno == EINTR);
    close(fd);
    if (got <= 0)
        return -1;
    buf[got] = '\0';
    at = buf;
    if (key_len > 0) {
        for (;;) {
            if (strncmp(at, key, (size_t)key_len) == 0 && at[key_len] == ' ') {
                at += key_len + 1;
                break;
            }
            at = strchr(at, '\n');
            if (at == NULL)
                return -1;
            at++;
        }
    }
    errno = 0;
    *value = strtoll(at, &end, 10);
    if (errno != 0 || end == at || (*end != '\n' && *end != '\0' && *end != ' '))
        return -1;
    return 0;
}

/* The directory ``dir`` (its first ``len`` bytes) as ``*dir_fd`` (O_PATH), opened unless
 * it is the one ``*dir_fd`` is already (``cur``): a group's files are opened relative to
 * it, each a short lookup instead of the whole path's walk. -1 if it cannot be opened. */
static int
enter(const char *dir, size_t len, char *cur, int *dir_fd)
{
    if (*dir_fd >= 0 && strlen(cur) == len && memcmp(cur, dir, len) == 0)
        return 0;
    if (*dir_fd >= 0)
        close(*dir_fd);
    *cur = '\0';
    if (len >= PATH_MAX) {
        *dir_fd = -1;
        return -1;
    }
    memcpy(cur, dir, len);
    cur[len] = '\0';
    *dir_fd = open(cur, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (*dir_fd < 0)
        *cur = '\0';
    return *dir_fd < 0 ? -1 : 0;
}

/* The operations on the group ``name``, in order, the GIL released: 0 if every one held
 * (``read`` then holds the OP_READ values), -1 at the first that did not. */
static int
run_ops(const struct op *ops, Py_ssize_t n, const char *name, Py_ssize_t name_len,
        long long *read)
{
    Py_ssize_t i, n_read = 0;
    char cur[PATH_MAX], path[PATH_MAX];
    int dir_fd = -1, ok = 0;
    for (i = 0; i < n && ok == 0; i++) {
        const struct op *o = &ops[i];
        Py_ssize_t len = o->head_len + name_len + o->tail_len;
        const char *base;
        long long value;
        if (len >= PATH_MAX) {
            ok = -1;
            break;
        }
        memcpy(path, o->head, (size_t)o->head_len);
        memcpy(path + o->head_len, name, (size_t)name_len);
        memcpy(path + o->head_len + name_len, o->tail, (size_t)o->tail_len);
        path[len] = '\0';
        if (o->kind == OP_NO_SUBGROUPS) {
            /* A cgroup directory's link count is 2 + its subgroups (kernfs). */
            struct stat st;
            if (enter(path, (size_t)len, cur, &dir_fd) < 0 || fstat(dir_fd, &st) < 0 ||
                !S_ISDIR(st.st_mode) || st.st_nlink != 2)
                ok = -1;
            continue;
        }
        base = strrchr(path, '/');
        if (base == NULL || enter(path, (size_t)(base - path), cur, &dir_fd) < 0) {
            ok = -1;
            continue;
        }
        base++;
        switch (o->kind) {
        case OP_AT_MOST:
            if (file_value(dir_fd, base, o->key, o->key_len, &value) < 0 || value > o->value)
                ok = -1;
            break;
        case OP_WRITE: {
            ssize_t wrote;
            int fd = openat(dir_fd, base, O_WRONLY | O_CLOEXEC);
            if (fd < 0) {
                ok = -1;
                break;
            }
            do {
                wrote = write(fd, o->key, (size_t)o->key_len);
            } while (wrote < 0 && errno == EINTR);
            close(fd);
            if (wrote != o->key_len)
                ok = -1;
            break;
        }
        case OP_READ:
            if (file_value(dir_fd, base, o->key, o->key_len, &value) < 0)
                ok = -1;
            else
                read[n_read++] = value;
            break;
        default:
            ok = -1;
        }
    }
    if (dir_fd >= 0)
        close(dir_fd);
    return ok;
}

PyDoc_STRVAR(recycle_doc,
"recycle(operations, names) -> list[tuple[int, ...] | None]\n\n"
"Run the ``operations`` (each (kind, head, tail, key, value): its path is head + the\n"
"group's name + tail) on each group of ``names``, in order, every group with the GIL\n"
"released: 0 the directory has no subdirectory (subgroups); 1 the value of ``key`` in\n"
"the file (its \"key N\" line, or the file's one number for an empty key) is at most\n"
"``value``; 2 write ``key`` to the file; 3 read the value of ``key`` in the file.\n"
"Returns, per group, the values read (a tuple), or None from the first operation that\n"
"failed or did not hold (the rest of that group's are not run).");

static PyObject *
recycle(PyObject *self, PyObject *args)
{
    PyObject *ops_o, *names_o, *ops_f = NULL, *names_f = NULL, *result = NULL;
    struct op *ops = NULL;
    const char **names = NULL;
    Py_ssize_t *name_lens = NULL, n_ops, n_names = 0, n_reads = 0, g, i;
    long long *values = NULL;
    int *ok = NULL;

    if (!PyArg_ParseTuple(args, "OO:recycle", &ops_o, &names_o))
        return NULL;
    ops_f = PySequence_Fast(ops_o, "expected a sequence of operations");
    if (ops_f == NULL)
        return NULL;
    n_ops = PySequence_Fast_GET_SIZE(ops_f);
    ops = PyMem_Calloc((size_t)n_ops + 1, sizeof(struct op));
    if (ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n_ops; i++) {
        struct op *o = &ops[i];
        /* (The bytes stay alive: ops_f holds the tuples that hold them.) */
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ops_f, i), "iy#y#y#L:operation",
                              &o->kind, &o->head, &o->head_len, &o->tail, &o->tail_len,
                              &o->key, &o->key_len, &o->value))
            goto done;
        if (o->kind < OP_NO_SUBGROUPS || o->kind > OP_READ) {
            PyErr_SetString(PyExc_ValueError, "unknown operation");
            goto done;
        }
        if ((Py_ssize_t)strlen(o->head) != o->head_len ||
            (Py_ssize_t)strlen(o->tail) != o->tail_len) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte");
            goto done;
        }
        if (o->kind == OP_READ)
            n_reads++;
    }
    if (strings(names_o, &names_f, &names, NULL, &n_names) < 0)
        goto done;
    name_lens = PyMem_Calloc((size_t)n_names + 1, sizeof(Py_ssize_t));
    values = PyMem_Calloc((size_t)(n_names * n_reads) + 1, sizeof(long long));
    ok = PyMem_Calloc((size_t)n_names + 1, sizeof(int));
    if (name_lens == NULL || values == NULL || ok == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (g = 0; g < n_names; g++)
        name_lens[g] = (Py_ssize_t)strlen(names[g]);
    Py_BEGIN_ALLOW_THREADS
    for (g = 0; g < n_names; g++)
        ok[g] = run_ops(ops, n_ops, names[g], name_lens[g], values + g * n_reads) == 0;
    Py_END_ALLOW_THREADS
    result = PyList_New(n_names);
    if (result == NULL)
        goto done;
    for (g = 0; g < n_names; g++) {
        PyObject *item;
        if (!ok[g]) {
            item = Py_NewRef(Py_None);
        } else {
            item = PyTuple_New(n_reads);
            for (i = 0; item != NULL && i < n_reads; i++) {
                PyObject *v = PyLong_FromLongLong(values[g * n_reads + i]);
                if (v == NULL)
                    Py_CLEAR(item);
                else
                    PyTuple_SET_ITEM(item, i, v);
            }
        }
        if (item == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, g, item);
    }
done:
    Py_XDECREF(ops_f);
    Py_XDECREF(names_f);
    PyMem_Free(ops);
    PyMem_Free(names);
    PyMem_Free(name_lens);
    PyMem_Free(values);
    PyMem_Free(ok);
    return result;
}

static PyMethodDef methods[] = {
    {"make_place", make_place, METH_VARARGS, make_place_doc},
    {"remove_dirs", remove_dirs, METH_O, remove_dirs_doc},
    {"recycle", recycle, METH_VARARGS, recycle_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cplace",
    "A job's place made, and groups recycled or removed, with the GIL released (see _place.py).",
    -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cplace(void)
{
    return PyModule_Create(&module);
}
