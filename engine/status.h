/* A snapshot of what a digfs node is doing, and its JSON form (served on the control socket,
 * read by `digfs status`).
 *
 * Thread safety: reentrant; a snapshot is plain data. */
#ifndef DG_STATUS_H
#define DG_STATUS_H

#include <stddef.h>
#include <stdint.h>

/* One root that readers have open. */
struct dg_status_root {
    uint8_t root[32];
    uint64_t length;
    uint64_t blocks_held;
    uint64_t blocks_total;
    unsigned readers; /* open content handles */
};

/* One swarm: a root fetched or served over the network. */
struct dg_status_swarm {
    uint8_t root[32];
    int known; /* its length and piece layer are verified */
    uint64_t length;
    uint64_t blocks_held;
    uint64_t blocks_total;
    uint64_t peers;
    uint64_t peers_tcp, peers_utp, peers_relayed, peers_punched; /* by how they connected */
    uint64_t bytes_in, bytes_out;
};

/* The node on the network. */
struct dg_status_network {
    unsigned port;           /* TCP and UDP */
    uint64_t dht_nodes;      /* routing table entries */
    uint64_t dht_good;       /* ... that answered recently */
    uint64_t dht_searches;   /* lookups running */
    uint64_t dht_stored;     /* peers stored for others */
    uint64_t dht_malformed;  /* datagrams dropped as malformed */
    char public_address[64]; /* learned from DHT replies ("ip:port"), or "" */
    uint64_t peers;          /* connected, all swarms */
    uint64_t bytes_in, bytes_out;
    uint64_t blocks_in, blocks_out;
    uint64_t banned;    /* addresses banned for bad data */
    uint64_t malformed; /* connections closed for breaking the protocol */
    uint64_t announces;
    uint64_t stalled;  /* connections dropped for silence while owing blocks */
    uint64_t replaced; /* silent connections replaced by a new one from the same node */
    int has_portmap;   /* UPnP or NAT-PMP is on */
    int portmap_mapped;
    char portmap_method[16]; /* "NAT-PMP", "UPnP" or "" */
    char portmap_ip[64];     /* the router's public address, "" when unknown */
    unsigned portmap_tcp, portmap_udp;
    char portmap_error[160];
    int has_nat;         /* the fields below are filled */
    char nat_class[16];  /* "unknown", "none", "easy", "hard" (engine/holepunch.h) */
    char nat_reason[64]; /* how it was decided */
    uint64_t nat_observers, nat_ports;
    char nat_address[64];   /* our address as most observers see it, or "" */
    char nat_peers_see[64]; /* our IP as most peers report it (hello yourip), or "" */
    uint64_t nat_peer_reports;
    uint64_t utp_connections, utp_retransmits, utp_malformed;
    uint64_t hp_connects, hp_punched, hp_relayed, hp_failed, hp_forwarded, hp_answered;
    uint64_t hp_peer_rendezvous; /* holepunch asks served as a peer connected to both */
    int relay_on;
    unsigned relay_port;
    uint64_t relay_streams, relay_streams_total, relay_bytes;
};

struct dg_status {
    const char *version;
    const char *data_dir;
    const char *cache_dir;
    int64_t uptime_s;
    uint64_t shared_files; /* files recorded under shared/ */
    uint64_t shared_hashed;
    uint64_t shared_failed;
    uint64_t hash_queue;    /* files waiting to be hashed or being hashed */
    uint64_t roots_held;    /* roots listed in by-hash/ */
    uint64_t cache_bytes;   /* block storage in use */
    uint64_t cache_limit;   /* 0: unlimited */
    uint64_t reads_waiting; /* reads waiting for blocks */
    size_t open_count;
    struct dg_status_root *open; /* open_count entries, owned by the snapshot */
    int has_network;
    struct dg_status_network network;
    size_t swarm_count;
    struct dg_status_swarm *swarms; /* swarm_count entries, owned by the snapshot */
};

/* The JSON object for @p s, NUL-terminated, malloc'd (free() it); NULL when out of memory.
 * Keys: version, uptime_s, data_dir, cache_dir, shared {files, hashed, failed, hash_queue},
 * roots {held}, cache {bytes, limit}, reads {waiting}, open [{root, length, blocks_held,
 * blocks_total, readers}], network (null without one: {port, dht {nodes, good, searches,
 * stored_peers, malformed}, public_address (string or null), peers, bytes_in, bytes_out,
 * blocks_in, blocks_out, banned, malformed, announces, stalled, replaced, portmap (null when
 * UPnP and NAT-PMP are off: {mapped, method, external_ip, tcp, udp, error}), nat (null without
 * the UDP port: {class, reason, observers, ports, address, peers_see, peer_reports, utp
 * {connections, retransmits, malformed}, holepunch {asked, punched, relayed, failed,
 * forwarded, answered, rendezvous_for_peers}, relay (null when off: {port, streams,
 * streams_total, bytes})})}), swarms [{root, known, length, blocks_held, blocks_total, peers,
 * peers_by {tcp, utp, punched, relayed}, bytes_in, bytes_out}]. */
char *dg_status_to_json(const struct dg_status *s);

/* Frees what a snapshot owns (the open and swarms arrays). */
void dg_status_clear(struct dg_status *s);

#endif
