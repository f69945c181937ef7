/* libFuzzer target: a uTP context (engine/utp.c) fed arbitrary datagrams.
 *
 * At start the context has one outgoing connection in progress (to source 0) and accepts
 * incoming ones (every fourth SYN is refused). The input is a sequence of records
 * [ctl][len: 2 bytes, big-endian][len bytes of payload]:
 *   ctl bits 0-1  the source: 10.0.0.2:6881 (the peer we connect to), 10.0.0.3:7000,
 *                 [2001:db8::1]:8000, 127.0.0.1:9000 (loopback: large packets)
 *   ctl bit 2     fit the payload to what the context last sent that source (so that the
 *                 fuzzer gets past the connection ids and sequence numbers): if it has a
 *                 header and is not a SYN, its connection id becomes the id the context sent
 *                 with, plus -1, 0 or +1 (payload byte 2, low bits), its ack_nr the last
 *                 sequence number the context sent there less payload byte 18, its seq_nr the
 *                 context's last ack_nr plus payload byte 16
 *   ctl bits 3-5  advance the fake clock by n * n * 40 ms, then tick
 *   ctl bit 6     flush
 *   ctl bit 7     an application action, by payload byte 0: write (byte 2 squared times 20
 *                 bytes), close, pause or resume reading on connection number byte 1 (0: the
 *                 first outgoing one), or connect to source byte 1 again
 * At the end the clock runs on for ten minutes (every connection times out), the owner closes
 * what is left, one tick must free everything (dg_utp_count() == 0), and the context is freed;
 * LeakSanitizer checks that nothing is left.
 *
 * Checked: every datagram sent is uTP with a well-formed extension chain and at most a header,
 * a 255-byte extension and a loopback packet long; no callback runs for a closed connection or
 * after on_end; on_end comes at most once; dg_utp_count() stays within what was made. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/utp.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NSRC 4
#define MAXSOCKS 32

struct owner {
    struct dg_utp_sock *s;
    int used, closed, ended, connected;
    uint64_t bytes;
};

struct last {
    int have;
    uint16_t conn, seq, ack;
};

struct ctx {
    struct dg_utp *u;
    uint64_t now;
    struct sockaddr_storage src[NSRC];
    struct last last[NSRC];
    struct owner owners[MAXSOCKS];
    size_t made;
    unsigned syns;
};

static struct ctx *g; /* for the callbacks that get no arg */

static int src_of(const struct ctx *c, const struct sockaddr *a)
{
    for (int i = 0; i < NSRC; i++) {
        const struct sockaddr_storage *s = &c->src[i];
        if (s->ss_family != a->sa_family)
            continue;
        if (a->sa_family == AF_INET && memcmp(s, a, sizeof(struct sockaddr_in)) == 0)
            return i;
        if (a->sa_family == AF_INET6 && memcmp(s, a, sizeof(struct sockaddr_in6)) == 0)
            return i;
    }
    return -1;
}

static struct owner *owner_new(struct ctx *c, struct dg_utp_sock *s)
{
    for (int i = 0; i < MAXSOCKS; i++)
        if (!c->owners[i].used) {
            struct owner *o = &c->owners[i];
            memset(o, 0, sizeof(*o));
            o->used = 1;
            o->s = s;
            dg_utp_sock_set_data(s, o);
            c->made++;
            return o;
        }
    return NULL;
}

static void owner_close(struct owner *o)
{
    dg_utp_close(o->s, g->now);
    o->used = 0;
}

/* Every datagram the context sends must parse. */
static void check_packet(const uint8_t *buf, size_t len)
{
    size_t pos = DG_UTP_HEADER_LEN;
    uint8_t ext;

    if (!dg_utp_is_packet(buf, len) || len > DG_UTP_HEADER_LEN + 2 + 255 + DG_UTP_LOOPBACK_PACKET)
        abort();
    ext = buf[1];
    while (ext) {
        if (len - pos < 2 || len - pos - 2 < buf[pos + 1])
            abort();
        if (ext == 1 && (buf[pos + 1] == 0 || buf[pos + 1] % 4))
            abort();
        ext = buf[pos];
        pos += 2 + buf[pos + 1];
    }
}

static void f_send(void *arg, int path, const uint8_t *buf, size_t len, const struct sockaddr *to)
{
    struct ctx *c = arg;
    int i;

    if (path != 0)
        abort();
    check_packet(buf, len);
    if ((i = src_of(c, to)) >= 0) {
        c->last[i].have = 1;
        c->last[i].conn = (uint16_t)(buf[2] << 8 | buf[3]);
        c->last[i].seq = (uint16_t)(buf[16] << 8 | buf[17]);
        c->last[i].ack = (uint16_t)(buf[18] << 8 | buf[19]);
    }
}

static int f_accept(void *arg, struct dg_utp_sock *s)
{
    struct ctx *c = arg;
    struct owner *o;

    if (++c->syns % 4 == 0 || !(o = owner_new(c, s)))
        return -1;
    o->connected = 1;
    if (c->syns % 3 == 0) /* some write in on_accept */
        dg_utp_write(s, (const uint8_t *)"hello from on_accept", 20, c->now);
    return 0;
}

static struct owner *checked(struct dg_utp_sock *s)
{
    struct owner *o = dg_utp_sock_data(s);

    if (!o || !o->used || o->s != s || o->closed || o->ended)
        abort(); /* a callback for a closed or ended connection */
    return o;
}

static void f_connected(struct dg_utp_sock *s)
{
    struct owner *o = checked(s);
    if (o->connected)
        abort();
    o->connected = 1;
}

static void f_read(struct dg_utp_sock *s, const uint8_t *buf, size_t len)
{
    struct owner *o = checked(s);

    if (!buf || len == 0)
        abort();
    o->bytes += len;
    /* Echo a little, and sometimes close from inside the callback. */
    dg_utp_write(s, buf, len < 64 ? len : 64, g->now);
    if (buf[0] == 0xcc)
        owner_close(o);
}

static void f_writable(struct dg_utp_sock *s)
{
    checked(s);
}

static void f_end(struct dg_utp_sock *s, int err)
{
    struct owner *o = checked(s);

    if (err != 0 && err != -ECONNREFUSED && err != -ECONNRESET && err != -ETIMEDOUT)
        abort();
    o->ended = 1;
    if (dg_utp_write(s, (const uint8_t *)"x", 1, g->now) != -EPIPE)
        abort();
}

static const struct dg_utp_ops ops = {
    .send = f_send,
    .on_accept = f_accept,
    .on_connected = f_connected,
    .on_read = f_read,
    .on_writable = f_writable,
    .on_end = f_end,
};

static void set_sources(struct ctx *c)
{
    struct sockaddr_in *a;
    struct sockaddr_in6 *b;

    a = (struct sockaddr_in *)&c->src[0];
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(0x0a000002);
    a->sin_port = htons(6881);
    a = (struct sockaddr_in *)&c->src[1];
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(0x0a000003);
    a->sin_port = htons(7000);
    b = (struct sockaddr_in6 *)&c->src[2];
    b->sin6_family = AF_INET6;
    b->sin6_addr.s6_addr[0] = 0x20;
    b->sin6_addr.s6_addr[1] = 0x01;
    b->sin6_addr.s6_addr[2] = 0x0d;
    b->sin6_addr.s6_addr[3] = 0xb8;
    b->sin6_addr.s6_addr[15] = 1;
    b->sin6_port = htons(8000);
    a = (struct sockaddr_in *)&c->src[3];
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(0x7f000001);
    a->sin_port = htons(9000);
}

static void connect_to(struct ctx *c, int src)
{
    struct dg_utp_sock *s;

    if (dg_utp_connect(c->u, 0, (const struct sockaddr *)&c->src[src], c->now, &s) == 0 &&
        !owner_new(c, s))
        dg_utp_close(s, c->now);
}

static void app_action(struct ctx *c, const uint8_t *p, size_t len)
{
    static uint8_t buf[65536];
    struct owner *o;
    int k;

    if (len < 2)
        return;
    k = p[1] % MAXSOCKS;
    o = &c->owners[k];
    switch (p[0] % 5) {
    case 0:
        connect_to(c, p[1] % NSRC);
        return;
    case 1: /* up to 1.3 MB, more than the send buffer takes */
        if (o->used && o->connected && !o->ended) {
            size_t n = len > 2 ? (size_t)p[2] * p[2] * 20 + len : len;
            memset(buf, p[0], sizeof(buf));
            while (n && o->used) {
                size_t chunk = n < sizeof(buf) ? n : sizeof(buf);
                long r = dg_utp_write(o->s, buf, chunk, c->now);
                if (r < 0 && r != -EPIPE && r != -ENOMEM)
                    abort();
                if (r <= 0)
                    break;
                n -= (size_t)r;
            }
        }
        return;
    case 2:
        if (o->used)
            owner_close(o);
        return;
    default:
        if (o->used)
            dg_utp_set_reading(o->s, p[0] % 5 == 4, c->now);
        return;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ctx c;
    struct dg_utp_stats st;
    static uint8_t pkt[65536];

    memset(&c, 0, sizeof(c));
    g = &c;
    set_sources(&c);
    c.now = (1ull << 32) - 2000000; /* 32-bit timestamps wrap two seconds in */
    if (dg_utp_new(&ops, &c, 42, &c.u) != 0)
        return 0;
    connect_to(&c, 0);

    while (size >= 3) {
        uint8_t ctl = data[0];
        size_t len = (size_t)data[1] << 8 | data[2];
        int src = ctl & 3;
        data += 3;
        size -= 3;
        if (len > size)
            len = size;
        memcpy(pkt, data, len);
        data += len;
        size -= len;

        if ((ctl & 4) && len >= DG_UTP_HEADER_LEN && (pkt[0] >> 4) != 4 && c.last[src].have) {
            const struct last *l = &c.last[src];
            uint16_t conn = (uint16_t)(l->conn + (pkt[2] & 3) - 1);
            uint16_t ack = (uint16_t)(l->seq - pkt[18]);
            uint16_t seq = (uint16_t)(l->ack + pkt[16]);
            pkt[2] = (uint8_t)(conn >> 8);
            pkt[3] = (uint8_t)conn;
            pkt[16] = (uint8_t)(seq >> 8);
            pkt[17] = (uint8_t)seq;
            pkt[18] = (uint8_t)(ack >> 8);
            pkt[19] = (uint8_t)ack;
        }
        if (ctl & 0x80) {
            app_action(&c, pkt, len);
        } else {
            /* An exact-size copy, so ASan sees any read past the end. */
            uint8_t *copy = malloc(len ? len : 1);
            if (!copy)
                break;
            memcpy(copy, pkt, len);
            int rc = dg_utp_input(c.u, 0, copy, len, (const struct sockaddr *)&c.src[src], c.now);
            if (rc != dg_utp_is_packet(copy, len))
                abort();
            free(copy);
        }
        if (ctl & 0x40)
            dg_utp_flush(c.u, c.now);
        if (ctl & 0x38) {
            uint64_t n = (ctl >> 3) & 7;
            c.now += n * n * 40000;
            dg_utp_tick(c.u, c.now);
        }
        if (dg_utp_count(c.u) > c.made + DG_UTP_MAX_CONNS)
            abort();
    }

    /* Ten minutes on: every connection ends; the owner closes them; ticks free them. */
    for (int i = 0; i < 600; i++) {
        c.now += 1000000;
        dg_utp_flush(c.u, c.now);
        dg_utp_tick(c.u, c.now);
        for (int k = 0; k < MAXSOCKS; k++)
            if (c.owners[k].used && c.owners[k].ended)
                owner_close(&c.owners[k]);
    }
    for (int k = 0; k < MAXSOCKS; k++)
        if (c.owners[k].used)
            owner_close(&c.owners[k]);
    dg_utp_tick(c.u, c.now);
    if (dg_utp_count(c.u) != 0)
        abort(); /* a connection nobody can free any more */
    dg_utp_get_stats(c.u, &st);
    if (st.packets_in > 1000000)
        abort();
    dg_utp_free(c.u);
    g = NULL;
    return 0;
}
