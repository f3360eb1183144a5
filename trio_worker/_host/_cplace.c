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

/* recycle's operations on a group's files (mirror _cgroups._Op). */
enum { OP_NO_SUBGROUPS = 0, OP_AT_MOST = 1, OP_WRITE = 2, OP_READ = 3 };

struct op {
    int kind;
    const char *path, *key; /* key: a "key value" line's key, or "" for the whole file */
    Py_ssize_t key_len;
    long long value; /* OP_AT_MOST's bound */
};

/* The value ``key`` has in the cgroup file ``path`` ("key N" lines, or the file's one
 * number for an empty key); -1 if it cannot be read or has no such value. */
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

/* One group's operations, in order, the GIL released: 0 if every one held (``read``
 * then holds the OP_READ values), -1 at the first that did not. */
static int
run_ops(const struct op *ops, Py_ssize_t n, long long *read)
{
    Py_ssize_t i, n_read = 0;
    char cur[PATH_MAX];
    int dir_fd = -1, ok = 0;
    for (i = 0; i < n && ok == 0; i++) {
        const struct op *o = &ops[i];
        const char *name = strrchr(o->path, '/');
        long long value;
        if (o->kind == OP_NO_SUBGROUPS) {
            /* A cgroup directory's link count is 2 + its subgroups (kernfs). */
            struct stat st;
            if (enter(o->path, strlen(o->path), cur, &dir_fd) < 0 || fstat(dir_fd, &st) < 0 ||
                !S_ISDIR(st.st_mode) || st.st_nlink != 2)
                ok = -1;
            continue;
        }
        if (name == NULL || enter(o->path, (size_t)(name - o->path), cur, &dir_fd) < 0) {
            ok = -1;
            continue;
        }
        name++;
        switch (o->kind) {
        case OP_AT_MOST:
            if (file_value(dir_fd, name, o->key, o->key_len, &value) < 0 || value > o->value)
                ok = -1;
            break;
        case OP_WRITE: {
            ssize_t wrote;
            int fd = openat(dir_fd, name, O_WRONLY | O_CLOEXEC);
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
            if (file_value(dir_fd, name, o->key, o->key_len, &value) < 0)
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
"recycle(groups) -> list[tuple[int, ...] | None]\n\n"
"For each group (a sequence of operations (kind, path, key, value)), run its\n"
"operations in order, all groups with the GIL released: 0 the directory ``path`` has\n"
"no subdirectory (subgroups); 1 the value of ``key`` in the file ``path`` (its \"key N\"\n"
"line, or the file's one number for an empty key) is at most ``value``; 2 write\n"
"``key`` to ``path``; 3 read the value of ``key`` in ``path``. Returns, per group, the\n"
"values read (a tuple), or None from the first operation that failed or did not\n"
"hold (the rest of that group's are not run).");

static PyObject *
recycle(PyObject *self, PyObject *arg)
{
    PyObject *groups_f = NULL, *result = NULL, **op_fast = NULL;
    struct op *ops = NULL;
    Py_ssize_t n_groups, n_ops = 0, n_reads = 0, g, i, k;
    Py_ssize_t *first = NULL, *reads_at = NULL;
    long long *values = NULL;
    int *ok = NULL;

    groups_f = PySequence_Fast(arg, "expected a sequence of groups");
    if (groups_f == NULL)
        return NULL;
    n_groups = PySequence_Fast_GET_SIZE(groups_f);
    op_fast = PyMem_Calloc((size_t)n_groups + 1, sizeof(PyObject *));
    first = PyMem_Calloc((size_t)n_groups + 1, sizeof(Py_ssize_t));
    reads_at = PyMem_Calloc((size_t)n_groups + 1, sizeof(Py_ssize_t));
    ok = PyMem_Calloc((size_t)n_groups + 1, sizeof(int));
    if (op_fast == NULL || first == NULL || reads_at == NULL || ok == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (g = 0; g < n_groups; g++) {
        op_fast[g] = PySequence_Fast(PySequence_Fast_GET_ITEM(groups_f, g),
                                     "expected a sequence of operations");
        if (op_fast[g] == NULL)
            goto done;
        first[g] = n_ops;
        n_ops += PySequence_Fast_GET_SIZE(op_fast[g]);
    }
    first[n_groups] = n_ops;
    ops = PyMem_Calloc((size_t)n_ops + 1, sizeof(struct op));
    if (ops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (g = 0, k = 0; g < n_groups; g++) {
        reads_at[g] = n_reads;
        for (i = 0; i < PySequence_Fast_GET_SIZE(op_fast[g]); i++, k++) {
            PyObject *item = PySequence_Fast_GET_ITEM(op_fast[g], i);
            const char *path, *key;
            Py_ssize_t path_len, key_len;
            if (!PyArg_ParseTuple(item, "iy#y#L:operation", &ops[k].kind, &path, &path_len,
                                  &key, &key_len, &ops[k].value))
                goto done;
            if ((Py_ssize_t)strlen(path) != path_len) {
                PyErr_SetString(PyExc_ValueError, "embedded null byte");
                goto done;
            }
            if (ops[k].kind < OP_NO_SUBGROUPS || ops[k].kind > OP_READ) {
                PyErr_SetString(PyExc_ValueError, "unknown operation");
                goto done;
            }
            /* (The bytes stay alive: op_fast holds the tuples that hold them.) */
            ops[k].path = path;
            ops[k].key = key;
            ops[k].key_len = key_len;
            if (ops[k].kind == OP_READ)
                n_reads++;
        }
    }
    values = PyMem_Calloc((size_t)n_reads + 1, sizeof(long long));
    if (values == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (g = 0; g < n_groups; g++)
        ok[g] = run_ops(ops + first[g], first[g + 1] - first[g], values + reads_at[g]) == 0;
    Py_END_ALLOW_THREADS
    result = PyList_New(n_groups);
    if (result == NULL)
        goto done;
    for (g = 0; g < n_groups; g++) {
        PyObject *item;
        if (!ok[g]) {
            item = Py_NewRef(Py_None);
        } else {
            Py_ssize_t n = (g + 1 < n_groups ? reads_at[g + 1] : n_reads) - reads_at[g];
            item = PyTuple_New(n);
            for (i = 0; item != NULL && i < n; i++) {
                PyObject *v = PyLong_FromLongLong(values[reads_at[g] + i]);
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
    if (op_fast != NULL)
        for (g = 0; g < n_groups; g++)
            Py_XDECREF(op_fast[g]);
    Py_DECREF(groups_f);
    PyMem_Free(op_fast);
    PyMem_Free(first);
    PyMem_Free(reads_at);
    PyMem_Free(ok);
    PyMem_Free(ops);
    PyMem_Free(values);
    return result;
}

static PyMethodDef methods[] = {
    {"make_place", make_place, METH_VARARGS, make_place_doc},
    {"remove_dirs", remove_dirs, METH_O, remove_dirs_doc},
    {"recycle", recycle, METH_O, recycle_doc},
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
