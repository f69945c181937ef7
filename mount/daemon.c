#include "mount/daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int dg_daemon_start(void)
{
    int fds[2];
    pid_t pid;
    unsigned char status = 1;

    if (pipe2(fds, O_CLOEXEC) < 0)
        return -errno;
    pid = fork();
    if (pid < 0) {
        int err = errno;
        close(fds[0]);
        close(fds[1]);
        return -err;
    }
    if (pid == 0) {
        close(fds[0]);
        setsid();
        return fds[1];
    }
    close(fds[1]);
    for (;;) {
        ssize_t n = read(fds[0], &status, 1);
        if (n == 1)
            break;
        if (n < 0 && errno == EINTR)
            continue;
        /* The child died before reporting: collect its status for ours. */
        int ws;
        status = 1;
        if (waitpid(pid, &ws, 0) == pid && WIFEXITED(ws) && WEXITSTATUS(ws) != 0)
            status = (unsigned char)WEXITSTATUS(ws);
        break;
    }
    _exit(status);
}

void dg_daemon_ready(int fd, int status)
{
    unsigned char s = (unsigned char)(status ? (status > 255 ? 1 : status) : 0);

    if (status == 0) {
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
            dup2(null, STDERR_FILENO);
            if (null > STDERR_FILENO)
                close(null);
        }
        if (chdir("/") < 0) {
            /* nothing to do: the daemon uses absolute paths only */
        }
    }
    while (write(fd, &s, 1) < 0 && errno == EINTR)
        ;
    close(fd);
}
