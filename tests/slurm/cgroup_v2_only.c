/*
 * Test scaffolding only: an LD_PRELOAD shim for slurmd and slurmstepd in the test cluster.
 *
 * Why it exists: Slurm 22.05's cgroup/v2 plugin refuses to run on a hybrid host (cgroup v1
 * controllers mounted beside the cgroup2 hierarchy): it reads /proc/self/cgroup and stops with
 * "fatal: Hybrid mode is not supported" when that file lists any v1 line. CI and development
 * hosts are hybrid; production GPU nodes are unified (cgroup v2 only), where Slurm needs no help.
 * The product never loads or depends on this file.
 *
 * What it does: when the process opens /proc/self/cgroup, /proc/thread-self/cgroup or
 * /proc/<pid>/cgroup, it hands back a memfd holding only the file's "0::" line (the cgroup2
 * one), exactly as a unified host would show it. Every other open passes through untouched.
 * slurmd opens the file with openat() and read()s it byte by byte; fopen() is covered too
 * because glibc's fopen does not go through the interposable open().
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int is_proc_cgroup(const char *path)
{
	const char *rest;

	if (path == NULL || strncmp(path, "/proc/", 6) != 0)
		return 0;
	rest = path + 6;
	if (strncmp(rest, "self/", 5) == 0)
		rest += 5;
	else if (strncmp(rest, "thread-self/", 12) == 0)
		rest += 12;
	else {
		if (*rest < '0' || *rest > '9')
			return 0;
		while (*rest >= '0' && *rest <= '9')
			rest++;
		if (*rest != '/')
			return 0;
		rest++;
	}
	return strcmp(rest, "cgroup") == 0;
}

/* A memfd with the "0::" line of the cgroup file open on real_fd, which it closes; -1 on error
 * (errno set), so the caller fails the way a failed open would. */
static int unified_view(int real_fd)
{
	char buf[65536], out[65536];
	size_t len = 0, out_len = 0;
	ssize_t n;
	char *line, *end;
	int fd;

	while ((n = read(real_fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += (size_t)n;
	close(real_fd);
	if (n < 0)
		return -1;
	buf[len] = '\0';
	for (line = buf; *line != '\0'; line = end) {
		end = strchr(line, '\n');
		end = end ? end + 1 : line + strlen(line);
		if (strncmp(line, "0::", 3) == 0) {
			memcpy(out + out_len, line, (size_t)(end - line));
			out_len += (size_t)(end - line);
		}
	}
	fd = memfd_create("proc-cgroup-unified", MFD_CLOEXEC);
	if (fd < 0)
		return -1;
	if (write(fd, out, out_len) != (ssize_t)out_len || lseek(fd, 0, SEEK_SET) != 0) {
		close(fd);
		errno = EIO;
		return -1;
	}
	return fd;
}

typedef int (*openat_fn)(int, const char *, int, ...);
typedef int (*open_fn)(const char *, int, ...);
typedef FILE *(*fopen_fn)(const char *, const char *);

static int real_openat(int dirfd, const char *path, int flags, mode_t mode)
{
	static openat_fn next;

	if (next == NULL)
		next = (openat_fn)dlsym(RTLD_NEXT, "openat");
	return next(dirfd, path, flags, mode);
}

static int open_unified(const char *path)
{
	int fd = real_openat(AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);

	return fd < 0 ? -1 : unified_view(fd);
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int openat(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = mode_arg(flags, ap);
	va_end(ap);
	if (is_proc_cgroup(path) && (flags & O_ACCMODE) == O_RDONLY)
		return open_unified(path);
	return real_openat(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = mode_arg(flags, ap);
	va_end(ap);
	return openat(dirfd, path, flags, mode);
}

int open(const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = mode_arg(flags, ap);
	va_end(ap);
	return openat(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
	va_list ap;
	mode_t mode;

	va_start(ap, flags);
	mode = mode_arg(flags, ap);
	va_end(ap);
	return openat(AT_FDCWD, path, flags, mode);
}

static FILE *fopen_common(const char *path, const char *how, const char *symbol)
{
	int fd;
	FILE *stream;

	if (is_proc_cgroup(path) && how[0] == 'r' && strchr(how, '+') == NULL) {
		fd = open_unified(path);
		if (fd < 0)
			return NULL;
		stream = fdopen(fd, how);
		if (stream == NULL)
			close(fd);
		return stream;
	}
	return ((fopen_fn)dlsym(RTLD_NEXT, symbol))(path, how);
}

FILE *fopen(const char *path, const char *how)
{
	return fopen_common(path, how, "fopen");
}

FILE *fopen64(const char *path, const char *how)
{
	return fopen_common(path, how, "fopen64");
}
