#include "engine/status.h"

#include <cjson/cJSON.h>
#include <stdlib.h>

#include "engine/root_name.h"

static void add_u64(cJSON *obj, const char *key, uint64_t v)
{
    /* JSON numbers are doubles: exact up to 2^53, far beyond any count or size here. */
    cJSON_AddNumberToObject(obj, key, (double)v);
}

char *dg_status_to_json(const struct dg_status *s)
{
    cJSON *root = cJSON_CreateObject(), *o, *open;
    char hex[DG_ROOT_HEX_LEN + 1];
    char *out = NULL;

    if (!root)
        return NULL;
    cJSON_AddStringToObject(root, "version", s->version ? s->version : "");
    add_u64(root, "uptime_s", s->uptime_s > 0 ? (uint64_t)s->uptime_s : 0);
    cJSON_AddStringToObject(root, "data_dir", s->data_dir ? s->data_dir : "");
    cJSON_AddStringToObject(root, "cache_dir", s->cache_dir ? s->cache_dir : "");
    if ((o = cJSON_AddObjectToObject(root, "shared"))) {
        add_u64(o, "files", s->shared_files);
        add_u64(o, "hashed", s->shared_hashed);
        add_u64(o, "failed", s->shared_failed);
        add_u64(o, "hash_queue", s->hash_queue);
    }
    if ((o = cJSON_AddObjectToObject(root, "roots")))
        add_u64(o, "held", s->roots_held);
    if ((o = cJSON_AddObjectToObject(root, "cache"))) {
        add_u64(o, "bytes", s->cache_bytes);
        add_u64(o, "limit", s->cache_limit);
    }
    if ((o = cJSON_AddObjectToObject(root, "reads")))
        add_u64(o, "waiting", s->reads_waiting);
    if ((open = cJSON_AddArrayToObject(root, "open"))) {
        for (size_t i = 0; i < s->open_count; i++) {
            const struct dg_status_root *r = &s->open[i];
            cJSON *e = cJSON_CreateObject();
            if (!e)
                break;
            dg_root_format(r->root, hex);
            cJSON_AddStringToObject(e, "root", hex);
            add_u64(e, "length", r->length);
            add_u64(e, "blocks_held", r->blocks_held);
            add_u64(e, "blocks_total", r->blocks_total);
            add_u64(e, "readers", r->readers);
            cJSON_AddItemToArray(open, e);
        }
    }
    if (!s->has_network) {
        cJSON_AddNullToObject(root, "network");
    } else if ((o = cJSON_AddObjectToObject(root, "network"))) {
        const struct dg_status_network *n = &s->network;
        cJSON *d;
        add_u64(o, "port", n->port);
        if ((d = cJSON_AddObjectToObject(o, "dht"))) {
            add_u64(d, "nodes", n->dht_nodes);
            add_u64(d, "good", n->dht_good);
            add_u64(d, "searches", n->dht_searches);
            add_u64(d, "stored_peers", n->dht_stored);
            add_u64(d, "malformed", n->dht_malformed);
        }
        if (n->public_address[0])
            cJSON_AddStringToObject(o, "public_address", n->public_address);
        else
            cJSON_AddNullToObject(o, "public_address");
        add_u64(o, "peers", n->peers);
        add_u64(o, "bytes_in", n->bytes_in);
        add_u64(o, "bytes_out", n->bytes_out);
        add_u64(o, "blocks_in", n->blocks_in);
        add_u64(o, "blocks_out", n->blocks_out);
        add_u64(o, "banned", n->banned);
        add_u64(o, "malformed", n->malformed);
        add_u64(o, "announces", n->announces);
        add_u64(o, "stalled", n->stalled);
        add_u64(o, "replaced", n->replaced);
        if (!n->has_portmap) {
            cJSON_AddNullToObject(o, "portmap");
        } else if ((d = cJSON_AddObjectToObject(o, "portmap"))) {
            cJSON_AddBoolToObject(d, "mapped", n->portmap_mapped);
            cJSON_AddStringToObject(d, "method", n->portmap_method);
            cJSON_AddStringToObject(d, "external_ip", n->portmap_ip);
            add_u64(d, "tcp", n->portmap_tcp);
            add_u64(d, "udp", n->portmap_udp);
            cJSON_AddStringToObject(d, "error", n->portmap_error);
        }
        if (!n->has_nat) {
            cJSON_AddNullToObject(o, "nat");
        } else if ((d = cJSON_AddObjectToObject(o, "nat"))) {
            cJSON *x;
            cJSON_AddStringToObject(d, "class", n->nat_class);
            cJSON_AddStringToObject(d, "reason", n->nat_reason);
            add_u64(d, "observers", n->nat_observers);
            add_u64(d, "ports", n->nat_ports);
            if (n->nat_address[0])
                cJSON_AddStringToObject(d, "address", n->nat_address);
            else
                cJSON_AddNullToObject(d, "address");
            if (n->nat_peers_see[0])
                cJSON_AddStringToObject(d, "peers_see", n->nat_peers_see);
            else
                cJSON_AddNullToObject(d, "peers_see");
            add_u64(d, "peer_reports", n->nat_peer_reports);
            if ((x = cJSON_AddObjectToObject(d, "utp"))) {
                add_u64(x, "connections", n->utp_connections);
                add_u64(x, "retransmits", n->utp_retransmits);
                add_u64(x, "malformed", n->utp_malformed);
            }
            if ((x = cJSON_AddObjectToObject(d, "holepunch"))) {
                add_u64(x, "asked", n->hp_connects);
                add_u64(x, "punched", n->hp_punched);
                add_u64(x, "relayed", n->hp_relayed);
                add_u64(x, "failed", n->hp_failed);
                add_u64(x, "forwarded", n->hp_forwarded);
                add_u64(x, "answered", n->hp_answered);
                add_u64(x, "rendezvous_for_peers", n->hp_peer_rendezvous);
            }
            if (!n->relay_on) {
                cJSON_AddNullToObject(d, "relay");
            } else if ((x = cJSON_AddObjectToObject(d, "relay"))) {
                add_u64(x, "port", n->relay_port);
                add_u64(x, "streams", n->relay_streams);
                add_u64(x, "streams_total", n->relay_streams_total);
                add_u64(x, "bytes", n->relay_bytes);
            }
        }
    }
    if ((open = cJSON_AddArrayToObject(root, "swarms"))) {
        for (size_t i = 0; i < s->swarm_count; i++) {
            const struct dg_status_swarm *w = &s->swarms[i];
            cJSON *e = cJSON_CreateObject();
            if (!e)
                break;
            dg_root_format(w->root, hex);
            cJSON_AddStringToObject(e, "root", hex);
            cJSON_AddBoolToObject(e, "known", w->known);
            add_u64(e, "length", w->length);
            add_u64(e, "blocks_held", w->blocks_held);
            add_u64(e, "blocks_total", w->blocks_total);
            add_u64(e, "peers", w->peers);
            cJSON *via = cJSON_AddObjectToObject(e, "peers_by");
            if (via) {
                add_u64(via, "tcp", w->peers_tcp);
                add_u64(via, "utp", w->peers_utp);
                add_u64(via, "punched", w->peers_punched);
                add_u64(via, "relayed", w->peers_relayed);
            }
            add_u64(e, "bytes_in", w->bytes_in);
            add_u64(e, "bytes_out", w->bytes_out);
            cJSON_AddItemToArray(open, e);
        }
    }
    out = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return out;
}

void dg_status_clear(struct dg_status *s)
{
    free(s->open);
    s->open = NULL;
    s->open_count = 0;
    free(s->swarms);
    s->swarms = NULL;
    s->swarm_count = 0;
}
