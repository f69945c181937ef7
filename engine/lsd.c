/* LAN discovery (BEP 14): see lsd.h. */
#include "engine/lsd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "engine/log.h"

#define SEARCH_EVERY_MS 60000u /* one search per key per minute */
#define ANSWER_EVERY_MS 10000u /* one answer per key per 10 s */
#define RECENT 64              /* keys remembered for rate limiting */

/* When a key last went out. */
struct recent {
    uint8_t key[20];
    uint64_t at;
    int used;
};

struct dg_lsd {
    struct dg_lsd_config cfg;
    uv_loop_t *loop;
    uv_udp_t udp;
    struct sockaddr_in group;
    char cookie[DG_LSD_COOKIE_LEN + 1];
    uint8_t rbuf[DG_LSD_MAX_MESSAGE + 1];
    struct recent searched[RECENT], answered[RECENT];
    uint64_t sent, received, malformed;
};

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Whether [s, s + n) equals @p word, ignoring case. */
static int word_is(const char *s, size_t n, const char *word)
{
    return n == strlen(word) && strncasecmp(s, word, n) == 0;
}

int dg_lsd_parse(const uint8_t *buf, size_t len, struct dg_lsd_message *out)
{
    static const char first[] = "BT-SEARCH * HTTP/1.1";
    const char *p = (const char *)buf, *end = p + len;
    int have_port = 0;

    memset(out, 0, sizeof(*out));
    if (len > DG_LSD_MAX_MESSAGE)
        return -EBADMSG;
    for (int line = 0; p < end; line++) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *stop = eol ? eol : end;
        size_t n = (size_t)(stop - p);
        if (n > 0 && p[n - 1] == '\r')
            n--;
        if (line == 0) {
            if (!word_is(p, n, first))
                return -EBADMSG;
        } else if (n == 0) {
            break; /* end of the headers */
        } else {
            const char *colon = memchr(p, ':', n);
            if (!colon)
                return -EBADMSG;
            size_t nlen = (size_t)(colon - p);
            const char *v = colon + 1, *vend = p + n;
            while (v < vend && (*v == ' ' || *v == '\t'))
                v++;
            while (vend > v && (vend[-1] == ' ' || vend[-1] == '\t'))
                vend--;
            size_t vlen = (size_t)(vend - v);
            if (word_is(p, nlen, "Port")) {
                unsigned long port = 0;
                if (vlen == 0 || vlen > 5)
                    return -EBADMSG;
                for (size_t i = 0; i < vlen; i++) {
                    if (v[i] < '0' || v[i] > '9')
                        return -EBADMSG;
                    port = port * 10 + (unsigned long)(v[i] - '0');
                }
                if (port == 0 || port > 65535)
                    return -EBADMSG;
                out->port = (uint16_t)port;
                have_port = 1;
            } else if (word_is(p, nlen, "Infohash")) {
                if (vlen == 40 && out->nkeys < DG_LSD_MAX_KEYS) {
                    uint8_t key[20];
                    int ok = 1;
                    for (size_t i = 0; i < 20 && ok; i++) {
                        int hi = hexval(v[2 * i]), lo = hexval(v[2 * i + 1]);
                        ok = hi >= 0 && lo >= 0;
                        if (ok)
                            key[i] = (uint8_t)(hi << 4 | lo);
                    }
                    if (ok)
                        memcpy(out->keys[out->nkeys++], key, 20);
                }
            } else if (word_is(p, nlen, "cookie")) {
                if (vlen >= sizeof(out->cookie))
                    return -EBADMSG;
                memcpy(out->cookie, v, vlen);
                out->cookie[vlen] = '\0';
            }
        }
        if (!eol)
            break;
        p = eol + 1;
    }
    if (!have_port || out->nkeys == 0)
        return -EBADMSG;
    return 0;
}

int dg_lsd_format(uint16_t port, const uint8_t (*keys)[20], size_t nkeys, const char *cookie,
                  char *out, size_t cap)
{
    size_t n = 0;
    int w;

    if (nkeys == 0 || nkeys > DG_LSD_MAX_KEYS || port == 0 || !cookie)
        return -EINVAL;
    w = snprintf(out, cap, "BT-SEARCH * HTTP/1.1\r\nHost: %s:%d\r\nPort: %u\r\n", DG_LSD_GROUP,
                 DG_LSD_PORT, port);
    if (w < 0 || (size_t)w >= cap)
        return -ENOBUFS;
    n = (size_t)w;
    for (size_t k = 0; k < nkeys; k++) {
        if (cap - n < 10 + 40 + 2 + 1)
            return -ENOBUFS;
        memcpy(out + n, "Infohash: ", 10);
        n += 10;
        for (size_t i = 0; i < 20; i++) {
            static const char hex[] = "0123456789abcdef";
            out[n++] = hex[keys[k][i] >> 4];
            out[n++] = hex[keys[k][i] & 15];
        }
        out[n++] = '\r';
        out[n++] = '\n';
    }
    w = snprintf(out + n, cap - n, "cookie: %s\r\n\r\n\r\n", cookie);
    if (w < 0 || (size_t)w >= cap - n)
        return -ENOBUFS;
    n += (size_t)w;
    return n > DG_LSD_MAX_MESSAGE ? -ENOBUFS : (int)n;
}

/* Whether @p key went out less than @p gap ago; if not, notes that it goes now. */
static int recently(struct recent *r, const uint8_t key[20], uint64_t now, uint64_t gap)
{
    struct recent *oldest = &r[0];

    for (int i = 0; i < RECENT; i++) {
        if (r[i].used && memcmp(r[i].key, key, 20) == 0) {
            if (now - r[i].at < gap)
                return 1;
            r[i].at = now;
            return 0;
        }
        if (!r[i].used || r[i].at < oldest->at)
            oldest = &r[i];
    }
    memcpy(oldest->key, key, 20);
    oldest->at = now;
    oldest->used = 1;
    return 0;
}

static void send_key(struct dg_lsd *l, const uint8_t key[20])
{
    char msg[DG_LSD_MAX_MESSAGE];
    int n = dg_lsd_format(l->cfg.port, (const uint8_t(*)[20])key, 1, l->cookie, msg, sizeof(msg));
    uv_buf_t b;

    if (n < 0)
        return;
    b = uv_buf_init(msg, (unsigned)n);
    if (uv_udp_try_send(&l->udp, &b, 1, (const struct sockaddr *)&l->group) == n)
        l->sent++;
}

void dg_lsd_search(struct dg_lsd *l, const uint8_t key[20])
{
    if (!l || recently(l->searched, key, uv_now(l->loop), SEARCH_EVERY_MS))
        return;
    send_key(l, key);
}

static void alloc_recv(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct dg_lsd *l = h->data;

    (void)suggested;
    *buf = uv_buf_init((char *)l->rbuf, sizeof(l->rbuf));
}

static void on_recv(uv_udp_t *h, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *from,
                    unsigned flags)
{
    struct dg_lsd *l = h->data;
    struct dg_lsd_message m;

    if (nread <= 0 || !from || from->sa_family != AF_INET)
        return;
    if ((flags & UV_UDP_PARTIAL) || dg_lsd_parse((const uint8_t *)buf->base, (size_t)nread, &m)) {
        l->malformed++;
        return;
    }
    if (strcmp(m.cookie, l->cookie) == 0)
        return; /* our own, looped back */
    l->received++;
    struct sockaddr_in peer = *(const struct sockaddr_in *)from;
    peer.sin_port = htons(m.port);
    for (size_t i = 0; i < m.nkeys; i++) {
        if (l->cfg.found)
            l->cfg.found(l->cfg.arg, m.keys[i], &peer);
        if (l->cfg.holds && l->cfg.holds(l->cfg.arg, m.keys[i]) &&
            !recently(l->answered, m.keys[i], uv_now(l->loop), ANSWER_EVERY_MS))
            send_key(l, m.keys[i]);
    }
}

static void lsd_closed(uv_handle_t *h)
{
    free(h->data);
}

int dg_lsd_start(uv_loop_t *loop, const struct dg_lsd_config *cfg, struct dg_lsd **out)
{
    struct dg_lsd *l = calloc(1, sizeof(*l));
    struct sockaddr_in any;
    uint8_t raw[DG_LSD_COOKIE_LEN / 2];
    int rc;

    if (!l)
        return -ENOMEM;
    l->cfg = *cfg;
    l->loop = loop;
    if (RAND_bytes(raw, sizeof(raw)) != 1) {
        free(l);
        return -EIO;
    }
    for (size_t i = 0; i < sizeof(raw); i++)
        snprintf(l->cookie + 2 * i, 3, "%02x", raw[i]);
    uv_ip4_addr(DG_LSD_GROUP, DG_LSD_PORT, &l->group);
    uv_ip4_addr("0.0.0.0", DG_LSD_PORT, &any);
    uv_udp_init(loop, &l->udp);
    l->udp.data = l;
    rc = uv_udp_bind(&l->udp, (const struct sockaddr *)&any, UV_UDP_REUSEADDR);
    if (rc == 0)
        rc = uv_udp_set_membership(&l->udp, DG_LSD_GROUP, NULL, UV_JOIN_GROUP);
    if (rc == 0)
        rc = uv_udp_set_multicast_ttl(&l->udp, 1); /* this network only */
    if (rc == 0)
        rc = uv_udp_set_multicast_loop(&l->udp, 1); /* other nodes on this host too */
    if (rc == 0)
        rc = uv_udp_recv_start(&l->udp, alloc_recv, on_recv);
    if (rc < 0) {
        uv_close((uv_handle_t *)&l->udp, lsd_closed);
        return rc;
    }
    dg_log(DG_LOG_INFO, "lsd", "LAN discovery on %s:%d", DG_LSD_GROUP, DG_LSD_PORT);
    *out = l;
    return 0;
}

void dg_lsd_counts(const struct dg_lsd *l, uint64_t *sent, uint64_t *received, uint64_t *malformed)
{
    *sent = l ? l->sent : 0;
    *received = l ? l->received : 0;
    *malformed = l ? l->malformed : 0;
}

void dg_lsd_stop(struct dg_lsd *l)
{
    if (l)
        uv_close((uv_handle_t *)&l->udp, lsd_closed);
}
