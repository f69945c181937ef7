#include "engine/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <syslog.h>

static enum dg_log_level max_level = DG_LOG_INFO;
static int to_syslog;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"error", "warning", "info", "debug"};

void dg_log_set_level(enum dg_log_level level)
{
    max_level = level;
}

void dg_log_use_syslog(int on)
{
    to_syslog = on;
    if (on)
        openlog("digfs", LOG_PID, LOG_DAEMON);
}

void dg_log(enum dg_log_level level, const char *module, const char *fmt, ...)
{
    static const int syslog_prio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    char msg[1024];
    va_list ap;

    if (level > max_level)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (to_syslog) {
        syslog(syslog_prio[level], "[%s] %s", module, msg);
        return;
    }
    pthread_mutex_lock(&log_lock);
    fprintf(stderr, "digfs[%s] %s: %s\n", module, level_names[level], msg);
    pthread_mutex_unlock(&log_lock);
}
