#include "engine/control.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "engine/log.h"

#define MAX_REQUEST 256
#define MAX_CLIENTS 16
#define CLIENT_TIMEOUT_MS 5000

struct client {
    struct dg_control *ctl;
    uv_pipe_t pipe;
    uv_timer_t timer;
    uv_write_t write;
    char request[MAX_REQUEST];
    size_t len;
    char *reply;
    int closing;
    int handles_open;
    struct client *prev, *next;
};

struct dg_control {
    uv_pipe_t server;
    char *path;
    dg_control_handler handler;
    void *arg;
    struct client *clients;
    unsigned nclients;
    int stopping;
};

static void control_closed(uv_handle_t *h)
{
    struct dg_control *c = h->data;

    free(c->path);
    free(c);
}

static void client_handle_closed(uv_handle_t *h)
{
    struct client *cl = h->data;

    if (--cl->handles_open > 0)
        return;
    free(cl->reply);
    free(cl);
}

static void client_close(struct client *cl)
{
    struct dg_control *c = cl->ctl;

    if (cl->closing)
        return;
    cl->closing = 1;
    if (cl->prev)
        cl->prev->next = cl->next;
    else
        c->clients = cl->next;
    if (cl->next)
        cl->next->prev = cl->prev;
    c->nclients--;
    uv_close((uv_handle_t *)&cl->timer, client_handle_closed);
    uv_close((uv_handle_t *)&cl->pipe, client_handle_closed);
}

static void client_timeout(uv_timer_t *t)
{
    client_close(t->data);
}

static void written(uv_write_t *w, int status)
{
    (void)status;
    client_close(w->data);
}

static void alloc_buf(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct client *cl = h->data;

    (void)suggested;
    buf->base = cl->request + cl->len;
    buf->len = sizeof(cl->request) - 1 - cl->len;
}

/* Answers the complete request line in cl->request. */
static void respond(struct client *cl)
{
    struct dg_control *c = cl->ctl;
    char *reply = c->handler(c->arg, cl->request);
    size_t len;

    if (!reply) {
        const char *unknown = "{\"error\":\"unknown request\"}";
        reply = strdup(unknown);
        if (!reply) {
            client_close(cl);
            return;
        }
    }
    len = strlen(reply);
    cl->reply = realloc(reply, len + 2);
    if (!cl->reply) {
        free(reply);
        client_close(cl);
        return;
    }
    cl->reply[len] = '\n';
    cl->reply[len + 1] = '\0';
    uv_buf_t buf = uv_buf_init(cl->reply, (unsigned)(len + 1));
    uv_read_stop((uv_stream_t *)&cl->pipe);
    cl->write.data = cl;
    if (uv_write(&cl->write, (uv_stream_t *)&cl->pipe, &buf, 1, written) < 0)
        client_close(cl);
}

static void client_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct client *cl = s->data;
    char *nl;

    (void)buf;
    if (n < 0) {
        client_close(cl);
        return;
    }
    cl->len += (size_t)n;
    cl->request[cl->len] = '\0';
    nl = memchr(cl->request, '\n', cl->len);
    if (nl) {
        *nl = '\0';
        respond(cl);
    } else if (cl->len >= sizeof(cl->request) - 1) {
        client_close(cl); /* too long: not a request of ours */
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    struct dg_control *c = server->data;
    struct client *cl;

    if (status < 0)
        return;
    cl = calloc(1, sizeof(*cl));
    if (!cl)
        return;
    cl->ctl = c;
    uv_pipe_init(server->loop, &cl->pipe, 0);
    cl->pipe.data = cl;
    uv_timer_init(server->loop, &cl->timer);
    cl->timer.data = cl;
    cl->handles_open = 2;
    cl->next = c->clients;
    if (c->clients)
        c->clients->prev = cl;
    c->clients = cl;
    c->nclients++;
    if (uv_accept(server, (uv_stream_t *)&cl->pipe) < 0 || c->nclients > MAX_CLIENTS) {
        client_close(cl);
        return;
    }
    uv_timer_start(&cl->timer, client_timeout, CLIENT_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&cl->pipe, alloc_buf, client_read);
}

int dg_control_start(uv_loop_t *loop, const char *path, dg_control_handler handler, void *arg,
                     struct dg_control **out)
{
    struct dg_control *c;
    mode_t old_mask;
    int rc;

    if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
        return -ENAMETOOLONG;
    c = calloc(1, sizeof(*c));
    if (!c || !(c->path = strdup(path))) {
        free(c);
        return -ENOMEM;
    }
    c->handler = handler;
    c->arg = arg;
    uv_pipe_init(loop, &c->server, 0);
    c->server.data = c;
    unlink(path); /* stale: we hold the data directory's lock */
    /* Owner-only from the moment it exists: no window with a looser mode. */
    old_mask = umask(0177);
    rc = uv_pipe_bind(&c->server, path);
    umask(old_mask);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&c->server, 8, on_connection);
    if (rc < 0) {
        uv_close((uv_handle_t *)&c->server, control_closed);
        return rc;
    }
    chmod(path, 0600);
    *out = c;
    return 0;
}

void dg_control_stop(struct dg_control *c)
{
    if (!c || c->stopping)
        return;
    c->stopping = 1;
    while (c->clients)
        client_close(c->clients);
    unlink(c->path);
    uv_close((uv_handle_t *)&c->server, control_closed);
}
