/* Logging for every digfs module: one function, printf-checked formats.
 *
 * Thread safety: dg_log() may be called from any thread; one call writes one line. */
#ifndef DG_LOG_H
#define DG_LOG_H

enum dg_log_level {
    DG_LOG_ERROR = 0,
    DG_LOG_WARN = 1,
    DG_LOG_INFO = 2,
    DG_LOG_DEBUG = 3,
};

/* Sets the most verbose level that is written (default DG_LOG_INFO). */
void dg_log_set_level(enum dg_log_level level);

/* Sends output to syslog (after daemonizing) instead of stderr when @p on is non-zero. */
void dg_log_use_syslog(int on);

/* Writes one line "digfs[module] level: message" if @p level is enabled. */
void dg_log(enum dg_log_level level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
